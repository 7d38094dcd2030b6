r"""CrossQ on Gymnasium's Pendulum-v1, written with Keras 3 and keras_norms.

CrossQ (Bhatt et al., ICLR 2024, arXiv 1902.05605) is SAC without target
networks: the critic normalizes its activations with batch normalization
and evaluates the current pairs (s, a) and the next pairs (s', a' ~ pi(s'))
as one joint batch, so that both halves are normalized with the same
statistics. Its reference code (`sbx-rl`) uses Batch Renormalization with
momentum 0.99, plain BN for the first 100,000 steps and then `rmax=3`,
`dmax=5`; Adam with `beta_1=0.5` and learning rate 1e-3; one actor update
per 3 critic updates; a wide critic.

Three variants train on the same budget of environment steps:

- `crossq_brn`: CrossQ with keras_norms.BatchRenormalization, plain BN until
  the switch, then `rmax=3`, `dmax=5` at once (a schedule evaluated inside
  the compiled step). The reference switches after 100,000 of a run's
  typically 1,000,000 steps; here `--switch` (0.1) is that fraction of this
  run's gradient updates.
- `crossq_bn`: CrossQ with keras_norms.BatchNormalization (the paper's first
  version).
- `sac`: SAC with target networks (Polyak 0.005), no normalization, the
  reference's SAC defaults (learning rate 3e-4, critic width 256, an actor
  update per critic update).

Every 500 environment steps the policy is evaluated deterministically over 5
episodes. The script prints a table of the return (mean ± std over the
seeds) at each checkpoint and the wall time of training per update (an
environment step, a critic update and the actor's share; evaluation and
the first checkpoint's compiling left out), writes a learning-curve plot
(`--out`) and, with `--json`, one record per run. `--switch` and `--ramp`
change the BRN schedule (docs/guide/reinforcement-learning.md measures
some).

The algorithm is written once, as functions of the models' variable values
(`model.stateless_call` returns the new values of the normalization layers'
statistics, which are threaded through every update); the few lines that
differ between backends (taking a gradient, compiling a step) are in the
section "Backend glue". It runs on JAX, TensorFlow and PyTorch:

    KERAS_BACKEND=jax python examples/crossq.py   # 5 seeds, 3,000 steps: 8 min
    KERAS_BACKEND=jax python examples/crossq.py --critic-width 2048
    python examples/crossq.py --quick                     # under 2 minutes
    python examples/crossq.py --plot-from docs/crossq.json --out docs/crossq.png

Needs `pip install gymnasium matplotlib` (classic control: no download).
"""

import argparse
import json
import time

import gymnasium as gym
import keras
import numpy as np
from keras import layers
from keras import ops

import keras_norms

VARIANTS = ("crossq_brn", "crossq_bn", "sac")
GAMMA = 0.99
BATCH_SIZE = 256
LEARNING_STARTS = 100  # uniformly random actions before the first update
ACTOR_WIDTH = 256
EVAL_EPISODES = 5
# What differs between the variants (everything else is shared).
RECIPES = {
    "crossq_brn": dict(
        norm="brn", learning_rate=1e-3, beta_1=0.5, policy_delay=3, tau=None
    ),
    "crossq_bn": dict(
        norm="bn", learning_rate=1e-3, beta_1=0.5, policy_delay=3, tau=None
    ),
    "sac": dict(
        norm=None,
        learning_rate=3e-4,
        beta_1=0.9,
        policy_delay=1,
        tau=0.005,
        critic_width=256,
    ),
}


# ---------------------------------------------------------------------------
# Backend glue: a gradient and a compiled function on each backend.


def value_and_grad(fn):
    """`fn(x, *args) -> (loss, aux)` to `(loss, aux), d loss / d x`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.value_and_grad(fn, has_aux=True)
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_value_and_grad(x, *args):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss, aux = fn(x, *args)
            return (loss, aux), tape.gradient(loss, x)

        return tf_value_and_grad
    if backend == "torch":
        import torch

        def torch_value_and_grad(x, *args):
            x = [t.detach().requires_grad_(True) for t in x]
            loss, aux = fn(x, *args)
            grads = torch.autograd.grad(loss, x)
            detach = keras.tree.map_structure(lambda t: t.detach(), (loss, aux))
            return detach, list(grads)

        return torch_value_and_grad
    raise ValueError(f"Unsupported backend: {backend}")


def apply_gradients(optimizer, variables, optimizer_values, grads, values):
    """One optimizer step on `values`: new values and optimizer values.

    On JAX, stateless. TensorFlow's optimizers refuse `stateless_apply`; there
    and on PyTorch the optimizer updates `variables` (whose values `values`
    are) in place, and its own variables carry its state.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return optimizer.stateless_apply(optimizer_values, grads, values)
    if backend == "torch":
        import torch

        with torch.no_grad():
            optimizer.apply(grads, variables)
    else:
        optimizer.apply(grads, variables)
    return [v.value for v in variables], optimizer_values


def compiled(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn  # PyTorch: eager


# ---------------------------------------------------------------------------
# The networks.


def normalization(kind, switch):
    if kind == "bn":
        return keras_norms.BatchNormalization(momentum=0.99)
    layer = keras_norms.BatchRenormalization(
        momentum=0.99, renorm_momentum=0.99
    )
    start, ramp = switch
    if ramp == 0:
        # CrossQ's switch: plain BN (r = 1, d = 0) for `start` training calls
        # of the layer, then rmax = 3 and dmax = 5 at once.
        layer.set_clipping_schedule(
            rmax=lambda step: ops.where(step < start, 1.0, 3.0),
            dmax=lambda step: ops.where(step < start, 0.0, 5.0),
        )
    else:
        # Or from 1 and 0 to 3 and 5 linearly over `ramp` calls.
        def fraction(step):
            return ops.clip((step - start) / ramp, 0.0, 1.0)

        layer.set_clipping_schedule(
            rmax=lambda step: 1.0 + 2.0 * fraction(step),
            dmax=lambda step: 5.0 * fraction(step),
        )
    return layer


def mlp(x, width, norm, switch):
    """[norm] -> (Dense -> ReLU -> [norm]) x 2, as in the reference."""
    if norm:
        x = normalization(norm, switch)(x)
    for _ in range(2):
        x = layers.Dense(width, "relu", kernel_initializer="lecun_normal")(x)
        if norm:
            x = normalization(norm, switch)(x)
    return x


def make_actor(obs_dim, act_dim, norm, switch):
    """Outputs the mean and log-std of a Gaussian, squashed by tanh."""
    obs = keras.Input((obs_dim,))
    x = mlp(obs, ACTOR_WIDTH, norm, switch)
    out = layers.Dense(2 * act_dim, kernel_initializer="lecun_normal")(x)
    return keras.Model(obs, out, name="actor")


def make_critic(obs_dim, act_dim, width, norm, switch):
    """Two Q-networks side by side, each with its own normalization layers."""
    obs, act = keras.Input((obs_dim,)), keras.Input((act_dim,))
    x = layers.Concatenate()([obs, act])
    q = [
        layers.Dense(1, kernel_initializer="lecun_normal")(
            mlp(x, width, norm, switch)
        )
        for _ in range(2)
    ]
    return keras.Model([obs, act], layers.Concatenate()(q), name="critic")


def squashed_sample(out, eps):
    """An action tanh(u), u ~ N(mean, std), and its log-probability."""
    act_dim = out.shape[-1] // 2
    mean, log_std = out[:, :act_dim], ops.clip(out[:, act_dim:], -20.0, 2.0)
    u = mean + ops.exp(log_std) * eps
    log_prob = ops.sum(
        -0.5 * eps**2 - log_std - 0.5 * np.log(2 * np.pi), axis=1
    )
    # log(1 - tanh(u)^2), written to stay finite for large |u|.
    log_prob -= ops.sum(
        2.0 * (np.log(2.0) - u - ops.softplus(-2.0 * u)), axis=1
    )
    return ops.tanh(u), log_prob


# ---------------------------------------------------------------------------
# The agent: CrossQ, or SAC with target networks.


class Agent:
    def __init__(self, variant, obs_dim, act_dim, critic_width, switch):
        recipe = RECIPES[variant]
        self.joint = recipe["tau"] is None  # CrossQ: one joint critic batch
        self.tau = recipe["tau"]
        self.policy_delay = recipe["policy_delay"]
        self.target_entropy = -float(act_dim)
        norm = recipe["norm"]
        width = recipe.get("critic_width", critic_width)
        self.actor = make_actor(obs_dim, act_dim, norm, switch)
        self.critic = make_critic(obs_dim, act_dim, width, norm, switch)
        # log(alpha), alpha = 1 at the start.
        self.log_alpha = keras.Variable(0.0, dtype="float32", name="log_alpha")

        def adam(variables, beta_1=recipe["beta_1"]):
            optimizer = keras.optimizers.Adam(recipe["learning_rate"], beta_1)
            optimizer.build(variables)
            return optimizer

        self.actor_optimizer = adam(self.actor.trainable_variables)
        self.critic_optimizer = adam(self.critic.trainable_variables)
        self.alpha_optimizer = adam([self.log_alpha], beta_1=0.9)
        self.state = {
            "actor": [v.value for v in self.actor.trainable_variables],
            "actor_stats": [
                v.value for v in self.actor.non_trainable_variables
            ],
            "critic": [v.value for v in self.critic.trainable_variables],
            "critic_stats": [
                v.value for v in self.critic.non_trainable_variables
            ],
            "target": []
            if self.joint
            else [v.value for v in self.critic.trainable_variables],
            "log_alpha": self.log_alpha.value,
            "actor_opt": [v.value for v in self.actor_optimizer.variables],
            "critic_opt": [v.value for v in self.critic_optimizer.variables],
            "alpha_opt": [v.value for v in self.alpha_optimizer.variables],
        }
        self._critic_grad = value_and_grad(self.critic_loss)
        self._actor_grad = value_and_grad(self.actor_loss)
        self.update_critic = compiled(self._update_critic)
        self.update_actor = compiled(self._update_actor)
        self.policy = compiled(self._policy)

    def _policy(self, actor, actor_stats, obs):
        return self.actor.stateless_call(
            actor, actor_stats, obs, training=False
        )[0]

    def critic_loss(
        self,
        critic,
        critic_stats,
        target,
        actor,
        actor_stats,
        alpha,
        batch,
        eps,
    ):
        obs, act, reward, next_obs, done = batch
        next_act, next_log_prob = squashed_sample(
            self._policy(actor, actor_stats, next_obs), eps
        )
        if self.joint:
            # CrossQ: (s, a) and (s', a') through the critic as one batch, in
            # training mode: one set of batch statistics for both halves.
            q_both, critic_stats = self.critic.stateless_call(
                critic,
                critic_stats,
                [
                    ops.concatenate([obs, next_obs]),
                    ops.concatenate([act, next_act]),
                ],
                training=True,
            )
            q, next_q = ops.split(q_both, 2)
        else:
            q, critic_stats = self.critic.stateless_call(
                critic, critic_stats, [obs, act], training=True
            )
            next_q = self.critic.stateless_call(
                target, critic_stats, [next_obs, next_act], training=False
            )[0]
        next_v = ops.min(next_q, axis=1) - alpha * next_log_prob
        target_q = ops.stop_gradient(reward + GAMMA * (1.0 - done) * next_v)
        loss = 0.5 * ops.sum(ops.mean((target_q[:, None] - q) ** 2, axis=0))
        return loss, critic_stats

    def actor_loss(
        self, actor, actor_stats, critic, critic_stats, alpha, obs, eps
    ):
        out, actor_stats = self.actor.stateless_call(
            actor, actor_stats, obs, training=True
        )
        act, log_prob = squashed_sample(out, eps)
        # The critic in inference mode: its statistics do not move here.
        q = self.critic.stateless_call(
            critic, critic_stats, [obs, act], training=False
        )[0]
        loss = ops.mean(alpha * log_prob - ops.min(q, axis=1))
        return loss, (actor_stats, -ops.mean(log_prob))

    def _update_critic(self, state, batch, eps):
        (loss, stats), grads = self._critic_grad(
            state["critic"],
            state["critic_stats"],
            state["target"],
            state["actor"],
            state["actor_stats"],
            ops.exp(state["log_alpha"]),
            batch,
            eps,
        )
        critic, opt = apply_gradients(
            self.critic_optimizer,
            self.critic.trainable_variables,
            state["critic_opt"],
            grads,
            state["critic"],
        )
        state = dict(state, critic=critic, critic_stats=stats, critic_opt=opt)
        if self.tau is not None:  # SAC: Polyak averaging of the target critic
            state["target"] = [
                (1.0 - self.tau) * t + self.tau * c
                for t, c in zip(state["target"], critic)
            ]
        return state, loss

    def _update_actor(self, state, obs, eps):
        (loss, (stats, entropy)), grads = self._actor_grad(
            state["actor"],
            state["actor_stats"],
            state["critic"],
            state["critic_stats"],
            ops.exp(state["log_alpha"]),
            obs,
            eps,
        )
        actor, opt = apply_gradients(
            self.actor_optimizer,
            self.actor.trainable_variables,
            state["actor_opt"],
            grads,
            state["actor"],
        )
        # The temperature: loss log(alpha) * (entropy - target entropy).
        alpha_grad = ops.stop_gradient(entropy) - self.target_entropy
        (log_alpha,), alpha_opt = apply_gradients(
            self.alpha_optimizer,
            [self.log_alpha],
            state["alpha_opt"],
            [alpha_grad],
            [state["log_alpha"]],
        )
        state = dict(state, actor=actor, actor_stats=stats, actor_opt=opt)
        return dict(state, log_alpha=log_alpha, alpha_opt=alpha_opt), loss

    def act(self, obs, eps=None):
        """Actions in [-1, 1] for observations (the mean's without `eps`)."""
        obs = ops.convert_to_tensor(obs)
        out = self.policy(self.state["actor"], self.state["actor_stats"], obs)
        out = keras.ops.convert_to_numpy(out)
        act_dim = out.shape[-1] // 2
        if eps is None:
            return np.tanh(out[:, :act_dim])
        std = np.exp(np.clip(out[:, act_dim:], -20.0, 2.0))
        return np.tanh(out[:, :act_dim] + std * eps)


# ---------------------------------------------------------------------------
# Training and evaluation.


def evaluate(policy, seed, episodes):
    """The mean return over `episodes` episodes (environment seeds `seed`,
    `seed + 1`, ...) of `policy(observations) -> environment actions`."""
    envs = [gym.make("Pendulum-v1") for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    returns, done = np.zeros(episodes), np.zeros(episodes, bool)
    while not done.all():
        actions = policy(obs)
        for i, env in enumerate(envs):
            if done[i]:
                continue
            obs[i], reward, terminated, truncated, _ = env.step(actions[i])
            returns[i] += reward
            done[i] = terminated or truncated
    return float(returns.mean())


def train(
    variant,
    seed,
    steps,
    critic_width,
    switch,
    eval_every,
    episodes,
    log,
    ramp=0.0,
):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    env = gym.make("Pendulum-v1")
    env.action_space.seed(seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    high = env.action_space.high
    updates = steps - LEARNING_STARTS
    schedule = (round(switch * updates), round(ramp * updates))
    agent = Agent(variant, obs_dim, act_dim, critic_width, schedule)
    buffer = {
        "obs": np.zeros((steps, obs_dim), "float32"),
        "act": np.zeros((steps, act_dim), "float32"),
        "reward": np.zeros(steps, "float32"),
        "next_obs": np.zeros((steps, obs_dim), "float32"),
        "done": np.zeros(steps, "float32"),
    }
    curve, seconds, n_updates = [], [], 0
    obs, _ = env.reset(seed=seed)
    start = time.perf_counter()
    for t in range(steps):
        if t < LEARNING_STARTS:
            action = rng.uniform(-1.0, 1.0, act_dim).astype("float32")
        else:
            eps = rng.standard_normal((1, act_dim)).astype("float32")
            action = agent.act(obs[None].astype("float32"), eps)[0]
        next_obs, reward, terminated, truncated, _ = env.step(action * high)
        for key, value in zip(
            buffer, (obs, action, reward, next_obs, float(terminated))
        ):
            buffer[key][t] = value
        obs = env.reset()[0] if terminated or truncated else next_obs
        if t >= LEARNING_STARTS:
            index = rng.integers(0, t + 1, BATCH_SIZE)
            batch = tuple(
                ops.convert_to_tensor(buffer[key][index]) for key in buffer
            )
            noise = rng.standard_normal((2, BATCH_SIZE, act_dim)).astype(
                "float32"
            )
            eps = ops.convert_to_tensor(noise[0])
            agent.state, loss = agent.update_critic(agent.state, batch, eps)
            if n_updates % agent.policy_delay == 0:
                eps = ops.convert_to_tensor(noise[1])
                agent.state, _ = agent.update_actor(agent.state, batch[0], eps)
            float(loss)  # waits for the step (JAX dispatches asynchronously)
            n_updates += 1
        if (t + 1) % eval_every == 0:
            seconds.append(time.perf_counter() - start)  # training only
            value = evaluate(
                lambda obs: agent.act(obs.astype("float32")) * high,
                10_000 + 100 * seed,
                episodes,
            )
            start = time.perf_counter()
            curve.append((t + 1, value))
            log(
                f"{variant:10s} seed {seed} step {t + 1:5d} return {value:8.1f}"
            )
    return {
        "variant": variant,
        "seed": seed,
        "steps": [s for s, _ in curve],
        "returns": [r for _, r in curve],
        # Wall time of training (environment steps, actions, one critic
        # update each and the actor's), per update, after the first
        # checkpoint (which includes compiling the steps).
        "ms_per_update": 1000
        * sum(seconds[1:])
        / (eval_every * len(seconds[1:])),
        "updates": n_updates,
        # [rmax, dmax, step] of the first BRN layer: the switch took effect
        # inside the compiled step, and only training calls counted.
        "critic_brn": renorm_state(agent.critic, agent.state["critic_stats"]),
        "actor_brn": renorm_state(agent.actor, agent.state["actor_stats"]),
    }


def renorm_state(model, values):
    """rmax, dmax and step of the model's first BatchRenormalization layer."""
    by_path = {v.path: x for v, x in zip(model.non_trainable_variables, values)}
    for layer in model.layers:
        if isinstance(layer, keras_norms.BatchRenormalization):
            names = ("rmax_value", "dmax_value", "step")
            variables = [getattr(layer, name) for name in names]
            return [
                float(ops.convert_to_numpy(by_path[v.path])) for v in variables
            ]
    return None


def table(runs, variants):
    checkpoints = runs[0]["steps"]
    lines = [
        "| variant | "
        + " | ".join(f"step {s}" for s in checkpoints)
        + " | ms/update |",
        "| --- | " + " | ".join("---" for _ in checkpoints) + " | --- |",
    ]
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        returns = np.array([r["returns"] for r in mine])
        cells = [
            f"{m:.0f} ± {s:.0f}"
            for m, s in zip(returns.mean(0), returns.std(0))
        ]
        ms = np.median([r["ms_per_update"] for r in mine])
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {ms:.1f} |")
    return "\n".join(lines)


def plot(runs, variants, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        steps = np.array(mine[0]["steps"])
        returns = np.array([r["returns"] for r in mine])
        ax.plot(steps, returns.mean(0), label=variant)
        ax.fill_between(steps, returns.min(0), returns.max(0), alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"return ({EVAL_EPISODES} episodes)")
    ax.set_title(f"Pendulum-v1, {len(mine)} seeds (line: mean, band: min-max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=EVAL_EPISODES)
    parser.add_argument(
        "--critic-width",
        type=int,
        default=256,
        help="CrossQ's critic width (256 for a CPU; the paper: 2048)",
    )
    parser.add_argument(
        "--switch",
        type=float,
        default=0.1,
        help="the fraction of the updates with plain BN before rmax=3, dmax=5",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="a fraction of the updates: rmax, dmax ramp linearly over it "
        "after the switch (0: at once)",
    )
    parser.add_argument("--out", default="crossq.png")
    parser.add_argument("--json", help="write one record per run to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one seed, 400 steps, small critic (for CI)",
    )
    parser.add_argument(
        "--plot-from",
        help="print the table and write the plot of an earlier --json run",
    )
    args = parser.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            runs = json.load(f)["runs"]
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        print(table(runs, variants))
        plot(runs, variants, args.out)
        return
    if args.quick:
        args.seeds, args.steps, args.eval_every = "0", 400, 200
        args.episodes, args.critic_width = 1, 64
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(
                f"--variants: {variant!r} is not one of {VARIANTS}"
            )
    if args.steps <= LEARNING_STARTS or args.steps % args.eval_every:
        raise ValueError(
            f"--steps must exceed {LEARNING_STARTS} and be a multiple of "
            f"--eval-every. Received: {args.steps}, {args.eval_every}"
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    runs = [
        train(
            variant,
            seed,
            args.steps,
            args.critic_width,
            args.switch,
            args.eval_every,
            args.episodes,
            lambda line: print(line, flush=True),
            args.ramp,
        )
        for variant in variants
        for seed in seeds
    ]
    seconds = time.perf_counter() - start
    print(
        f"\nbackend {keras.backend.backend()}, critic width "
        f"{args.critic_width}, {len(seeds)} seeds, {seconds:.0f} s"
    )
    print(table(runs, variants))
    plot(runs, variants, args.out)
    if args.json:
        recipe = {
            k: v for k, v in vars(args).items() if k not in ("out", "json")
        }
        record = {
            "backend": keras.backend.backend(),
            "recipe": recipe,
            "runs": runs,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
