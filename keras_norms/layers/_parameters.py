"""What every keras_norms batch-norm layer has: the learned affine `gamma`,
`beta` and the moving mean and variance, with their arguments and config.

Private: a mixin for `keras.layers.Layer` subclasses, so that the layers
resolve, validate, create and serialize these the same way.
"""

from keras import constraints
from keras import initializers
from keras import regularizers

from keras_norms import _checks

ARGUMENTS = (
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)
_SERIALIZERS = {
    "initializer": initializers,
    "regularizer": regularizers,
    "constraint": constraints,
}


def _module(name):
    return _SERIALIZERS.get(name.rsplit("_", 1)[-1])


class NormalizationParameters:
    def init_parameters(self, **arguments):
        """Validates and resolves the ARGUMENTS given as keywords."""
        self.momentum = _checks.check_unit_interval(
            "momentum", arguments.pop("momentum")
        )
        self.epsilon = _checks.check_positive(
            "epsilon", arguments.pop("epsilon")
        )
        self.center = _checks.check_bool("center", arguments.pop("center"))
        self.scale = _checks.check_bool("scale", arguments.pop("scale"))
        for name, value in arguments.items():
            setattr(self, name, _module(name).get(value))
        self.gamma = None
        self.beta = None

    def build_parameters(self, shape):
        """Creates gamma, beta (if used) and the moving statistics."""
        for name, enabled in (("gamma", self.scale), ("beta", self.center)):
            if enabled:
                weight = self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=getattr(self, f"{name}_initializer"),
                    regularizer=getattr(self, f"{name}_regularizer"),
                    constraint=getattr(self, f"{name}_constraint"),
                    trainable=True,
                    autocast=False,
                )
                setattr(self, name, weight)
        for name in ("moving_mean", "moving_variance"):
            weight = self.add_weight(
                shape=shape,
                name=name,
                initializer=getattr(self, f"{name}_initializer"),
                trainable=False,
                autocast=False,
            )
            setattr(self, name, weight)

    def parameters_config(self):
        config = {}
        for name in ARGUMENTS:
            value = getattr(self, name)
            module = _module(name)
            config[name] = value if module is None else module.serialize(value)
        return config
