"""Precise batch normalization: population statistics over a dataset."""

import contextlib
import itertools
import math
import sys
import types
import warnings

import keras
import numpy as np
from keras import ops

from keras_norms import _axes
from keras_norms import _backend
from keras_norms import _linear
from keras_norms import _moments
from keras_norms.layers import BatchNormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.utils import _graph

_NORMALIZATION_LAYERS = (
    BatchNormalization,
    CrossIterationBatchNormalization,
    keras.layers.BatchNormalization,
)


def recompute_statistics(
    model, x, steps=None, *, batch_size=None, layers=None, verbose="auto"
):
    """Sets the moving statistics of batch-norm layers to population values.

    The moving averages of training mix the statistics of many past
    weights, each from one (possibly tiny) batch of training-mode inputs.
    "Precise BN" replaces them with the exact mean and (biased) variance
    over `x` of what each layer normalizes at inference, weights frozen.

    Every `keras_norms.BatchNormalization`, `BatchRenormalization` and
    `CrossIterationBatchNormalization` and every
    `keras.layers.BatchNormalization` in `model` (or only those in
    `layers`), `trainable=False` ones included, is re-estimated from
    `model(x, training=False)` once every normalization layer upstream of
    it has its new statistics. Layers that do not depend on each other
    share a pass over `x` (a chain of `k` layers takes `k` passes, parallel
    branches share them); inside a model or layer whose call is Python
    code, layers take one pass each, in the order a first batch calls them.

    Masks are honoured as in training. A `CrossIterationBatchNormalization`
    gets the statistics of its wrapped layer's output.
    `BatchRenormalization` (and Keras's `BatchNormalization(renorm=True)`)
    also get `moving_stddev = sqrt(moving_variance + epsilon)`, and their
    running statistics for `r` and `d` the same population mean and
    standard deviation. Nothing else changes: no trainable weight, step
    counter or CBN buffer.

    Population statistics are not always what a network expects: a
    `BatchRenormalization` trained on a few values per feature and step
    (e.g. after a `Dense` layer at batch size 2) keeps running standard
    deviations well below them, which the next layers learned to expect.
    Compare held-out accuracy before and after.

    Args:
        model: A `keras.Model` (or layer), built or not.
        x: The inputs, as `fit()` takes them (Keras's data adapters read
            them, with `fit()`'s errors): an array (NumPy or a backend
            tensor) or a list, tuple or dict of arrays for a multi-input
            model (a tuple is inputs, not `(x, y)`), in batches of
            `batch_size`; or a `tf.data.Dataset`, `keras.utils.PyDataset`,
            torch `DataLoader` or Python generator of batches `x`, `(x,)`,
            `(x, y)` or `(x, y, sample_weight)` (only `x` is used). A
            generator's batches are kept in memory when the model needs
            several passes.
        steps: Number of batches read per pass, or `None` to read `x` until
            it is exhausted (an infinite dataset needs it). Arrays without
            `batch_size` then come in `steps` batches, as in `fit()`.
            Defaults to `None`.
        batch_size: Batch size for arrays; the statistics do not depend on
            it. A dataset, `PyDataset` or generator makes its own batches:
            passing `batch_size` with one raises a `ValueError` (`fit()`
            ignores it). Defaults to 32.
        layers: Optional list of normalization layers of `model`, or of
            their names, to recompute; the others keep their statistics.
            Defaults to `None` (all of them).
        verbose: `"auto"` (1), 0, 1 or 2, as in `predict()`: 0 is silent, 1
            shows a progress bar per pass (after a line "Pass 2/3" when
            there are several), 2 one line per pass. Defaults to `"auto"`.

    Returns:
        A dict from layer name to the number of positions (per feature,
        masked ones excluded) that its statistics were computed from. A
        layer that no position reaches keeps its statistics, with a warning.

    Reference:

    - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576),
      "Rethinking 'Batch' in BatchNorm", Section 3.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_norms
    >>> from keras_norms.utils import recompute_statistics
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8),
    ...     keras_norms.BatchNormalization(name="bn"),
    ... ])
    >>> x = np.random.normal(2.0, 3.0, size=(100, 4)).astype("float32")
    >>> recompute_statistics(model, x, batch_size=16, verbose=0)
    {'bn': 100}
    >>> h = keras.ops.convert_to_numpy(model.layers[0](x))
    >>> mean = keras.ops.convert_to_numpy(model.layers[1].moving_mean)
    >>> bool(np.allclose(mean, h.mean(axis=0), atol=1e-4))
    True
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Argument `model` must be a Keras model or layer. "
            f"Received: model={model!r}"
        )
    found = _graph.inner_layers(model, _NORMALIZATION_LAYERS, include_self=True)
    if not found:
        raise ValueError(
            "Argument `model` contains no batch-normalization layer "
            "(keras_norms.BatchNormalization, BatchRenormalization, "
            "CrossIterationBatchNormalization or "
            "keras.layers.BatchNormalization). Received: "
            f"model={model.name!r}"
        )
    targets = _select(found, layers)
    verbose = _check_verbose(verbose)
    batches = _Batches(x, steps, batch_size)

    dependencies, chains = _plan(model, targets)
    if chains:  # Python code decides the order: take it from a first batch.
        order = _call_order(model, targets, batches)
        for chain in chains:
            for later in chain:
                first = order[id(later)]
                earlier = [layer for layer in chain if order[id(layer)] < first]
                dependencies[id(later)].update(map(id, earlier))
    waves = _waves(targets, dependencies)
    batches.keep = len(waves) > 1

    moments = {id(layer): _Moments() for layer in targets}

    def record(layer, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        moments[id(layer)].add(*_normalized(layer, inputs, kwargs.get("mask")))

    for number, wave in enumerate(waves, 1):
        if verbose and len(waves) > 1:
            print(f"Pass {number}/{len(waves)}")
        progbar = keras.utils.Progbar(batches.size, verbose=verbose)
        step = 0
        # One pass over `x`, with the progress bar of `predict()`.
        with _intercepted(wave, record), _inference():
            for step, batch in enumerate(batches, 1):
                model(batch, training=False)
                progbar.update(step, finalize=False)
        progbar.update(step, finalize=True)
        for layer in wave:
            moments[id(layer)].assign(layer)

    counts = [
        (layer.name, int(np.min(moments[id(layer)].count))) for layer in targets
    ]
    unused = [name for name, positions in counts if not positions]
    if unused:
        warnings.warn(
            "recompute_statistics: no unmasked position of `x` reached "
            f"the layers {unused}; they keep their statistics.",
            stacklevel=2,
        )
    return dict(counts)


def _select(found, layers):
    if layers is None:
        return found
    error = TypeError(
        "Argument `layers` must be None or a list of layers or layer "
        f"names. Received: layers={layers!r}"
    )
    if not isinstance(layers, (list, tuple)):
        raise error
    if not layers:
        raise ValueError(
            "Argument `layers` must name at least one layer (use "
            "layers=None for all of them). Received: layers=[]"
        )
    chosen = set()
    for item in layers:
        if isinstance(item, str):
            what, matches = repr(item), [x for x in found if x.name == item]
        elif isinstance(item, keras.layers.Layer):
            what = f"the layer {item.name!r}"
            matches = [x for x in found if x is item]
        else:
            raise error
        if not matches:
            names = sorted({layer.name for layer in found})
            raise ValueError(
                f"Argument `layers` names {what}, which is not a "
                "batch-normalization layer of the model; those are "
                f"{names}. Received: layers={layers!r}"
            )
        chosen.update(id(x) for x in matches)
    return [layer for layer in found if id(layer) in chosen]


def _plan(model, targets):
    """`(dependencies, chains)`: the ids of the targets that each target's
    inputs depend on ("taints" passed through the graphs in place of
    tensors), and the targets inside each layer whose call is Python code,
    which also depend on each other in call order."""
    target_ids = {id(layer) for layer in targets}
    dependencies = {id(layer): set() for layer in targets}
    chains = []

    def visit(operation, taint):
        if id(operation) in target_ids:
            dependencies[id(operation)].update(taint)
            return taint | {id(operation)}
        if not isinstance(operation, keras.layers.Layer):  # a keras.ops call
            return taint
        inner = _graph.inner_layers(operation, _NORMALIZATION_LAYERS)
        inner = [layer for layer in inner if id(layer) in target_ids]
        if not inner:
            return taint
        if not _graph.has_graph(operation):
            for layer in inner:
                dependencies[id(layer)].update(taint)
            if len(inner) > 1:
                chains.append(inner)
            return taint | {id(layer) for layer in inner}
        if isinstance(operation, keras.Sequential):
            for layer in operation.layers:
                taint = visit(layer, taint)
            return taint
        return visit_graph(operation, taint)

    def visit_graph(model, taint):
        # A tensor that the walk has not reached (a model input) depends on
        # what the model's inputs depend on: `taint`.
        taints = {}
        for node in _graph.nodes(model):
            inputs = (taints.get(id(x), taint) for x in node.input_tensors)
            out = visit(node.operation, taint.union(*inputs))
            taints.update((id(x), out) for x in node.outputs)
        return taint.union(*(taints.get(id(x), taint) for x in model.outputs))

    visit(model, frozenset())
    return dependencies, chains


def _waves(targets, dependencies):
    """Groups the targets into passes, each after all it depends on."""
    done, waves, remaining = set(), [], list(targets)
    while remaining:
        # A cycle through layers shared between call sites has no exact
        # order: its layers take one pass each.
        wave = [
            layer
            for layer in remaining
            if dependencies[id(layer)] - {id(layer)} <= done
        ] or remaining[:1]
        done.update(id(layer) for layer in wave)
        remaining = [layer for layer in remaining if id(layer) not in done]
        waves.append(wave)
    return waves


class _Batches:
    """The inputs of the batches of `x`, `steps` per pass, read as `fit()`
    reads them. A generator is read once: its batches are kept for the next
    passes while `keep` is set. `size`: the batches per pass, once known."""

    def __init__(self, x, steps, batch_size):
        steps = _positive_int("steps", steps)
        batch_size = _positive_int("batch_size", batch_size)
        if x is None:  # The array adapter fails on it with a KeyError.
            raise ValueError("Unrecognized data type: x=None")
        # Keras's data adapters (private API, only here) take what `fit()`
        # takes, with its errors. Not its EpochIterator: with `steps` that
        # goes on where the last epoch stopped; every pass here starts anew.
        from keras.src.trainers import data_adapters

        self.adapter = data_adapters.get_data_adapter(
            x, batch_size=batch_size, steps_per_epoch=steps
        )
        if batch_size is not None and not isinstance(
            self.adapter, data_adapters.ArrayDataAdapter
        ):
            raise ValueError(  # `fit()` would ignore it without a word.
                f"When providing `x` as a {type(x).__name__}, `batch_size` "
                "should not be passed: the batches are those of `x`. "
                f"Received: batch_size={batch_size}"
            )
        tf = sys.modules.get("tensorflow")
        if steps is None and (  # `fit()` would read it forever.
            isinstance(x, keras.utils.PyDataset)
            and self.adapter.num_batches is None
            or tf is not None
            and isinstance(x, tf.data.Dataset)
            and x.cardinality() == tf.data.INFINITE_CARDINALITY
        ):
            raise ValueError(
                "Argument `x` is an infinite dataset: pass `steps`, the "
                "number of batches to read. Received: steps=None"
            )
        sizes = [n for n in (steps, self.adapter.num_batches) if n]
        self.steps, self.size = steps, min(sizes, default=None)
        self.keep, self._cache, self._iterator = True, [], None
        if isinstance(x, types.GeneratorType):  # it can be read only once
            self._iterator = self.adapter.get_numpy_iterator()

    def __iter__(self):
        count = 0
        # islice stops before reading a batch beyond `steps`.
        for element in itertools.islice(self._elements(), self.steps):
            count += 1
            yield keras.utils.unpack_x_y_sample_weight(element)[0]
        if count == 0:
            raise ValueError(
                "Argument `x` yielded no batch. Received: an empty array "
                "or dataset"
            )
        self.size = count

    def _elements(self):
        if self._iterator is None:  # Keras can read it again.
            self.adapter.on_epoch_begin()
            try:
                yield from self.adapter.get_numpy_iterator()
            finally:
                self.adapter.on_epoch_end()
            return
        yield from self._cache
        for element in self._iterator:
            if self.keep:
                self._cache.append(element)
            yield element


def _positive_int(name, value):
    if value is None:
        return None
    message = f"Argument `{name}` must be None or a positive int. Received: "
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{message}{name}={value!r}")
    if value < 1:
        raise ValueError(f"{message}{name}={value}")
    return int(value)


def _check_verbose(verbose):
    if isinstance(verbose, str) and verbose == "auto":
        return 1
    if isinstance(verbose, (int, np.integer)) and verbose in (0, 1, 2):
        return int(verbose)
    raise ValueError(
        'Argument `verbose` must be "auto", 0, 1 or 2. Received: '
        f"verbose={verbose!r}"
    )


def _inference():
    """No autograd graph during the passes (PyTorch records one)."""
    return _backend.no_grad()


@contextlib.contextmanager
def _intercepted(layers, record):
    """Calls `record(layer, args, kwargs)` after each call of `layers`, via
    an instance attribute `call`: `Layer.__call__` looks it up every time."""

    def intercept(layer, call):
        def recorded(*args, **kwargs):
            outputs = call(*args, **kwargs)  # first: it validates the mask
            record(layer, args, kwargs)
            return outputs

        return recorded

    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("call")))
            layer.call = intercept(layer, layer.call)
        yield
    finally:
        for layer, previous in reversed(saved):
            if previous is None:
                del layer.call
            else:
                layer.call = previous


def _call_order(model, targets, batches):
    """The index of each target's first call on the first batch (or inf)."""
    order = {}

    def record(layer, args, kwargs):
        order.setdefault(id(layer), len(order))

    with _intercepted(targets, record), _inference():
        model(next(iter(batches)), training=False)
    return {id(x): order.get(id(x), math.inf) for x in targets}


def _normalized(layer, inputs, mask):
    """What `layer` takes statistics of in training, and which positions:
    NumPy arrays `(values, keep)` of shape `(positions, features)`."""
    inputs = ops.cast(inputs, _moments.compute_dtype_for(inputs))
    if isinstance(layer, CrossIterationBatchNormalization):
        kernel = ops.cast(layer.layer.kernel, inputs.dtype)
        inputs = _linear.apply(layer.layer, inputs, kernel)
        bias = _linear.bias(layer.layer, inputs.dtype)
        if bias is not None:  # the moving mean is the biased output's
            shape = _axes.broadcast_shape(inputs.shape, (layer._channel_axis,))
            inputs = inputs + ops.reshape(bias, shape)
        axes = (layer._channel_axis,)
    else:
        axes = _graph.feature_axes(layer, len(inputs.shape))
    values = np.asarray(ops.convert_to_numpy(inputs), np.float64)
    keep = np.ones(values.shape, bool)
    if mask is not None:  # Keras's convention, as every layer reads it
        keep = _axes.broadcast_mask(ops.convert_to_tensor(mask), inputs)
        keep = np.broadcast_to(ops.convert_to_numpy(keep), values.shape)
    return _per_feature(values, axes), _per_feature(keep, axes)


def _per_feature(array, axes):
    """Moves the feature `axes` last, flattens to `(positions, features)`."""
    array = np.moveaxis(array, axes, range(-len(axes), 0))
    return array.reshape(-1, math.prod(array.shape[-len(axes) :]))


class _Moments:
    """Per-feature count, mean and sum of squared deviations, merged over
    batches with Chan et al.'s pairwise update (exact, stable)."""

    def __init__(self):
        self.count = self.mean = self.m2 = 0.0

    def add(self, values, keep):
        count = keep.sum(axis=0, dtype=np.float64)
        # `where`, not a product: masked positions may hold inf or NaN.
        mean = np.where(keep, values, 0.0).sum(axis=0) / np.maximum(count, 1.0)
        m2 = np.square(np.where(keep, values - mean, 0.0)).sum(axis=0)
        merged = self.count + count
        safe = np.maximum(merged, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / safe)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / safe)
        self.count = merged

    def assign(self, layer):
        """Sets the statistics of `layer` where positions reached them."""
        variance = self.m2 / np.maximum(self.count, 1.0)
        values = _graph.statistics(self.mean, variance, layer.epsilon)
        for name, value in values.items():
            variable = getattr(layer, name, None)
            if variable is not None:
                old = _graph.numpy(variable).reshape(-1)
                _graph.assign(variable, np.where(self.count > 0, value, old))
