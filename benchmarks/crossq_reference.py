r"""CrossQ with keras_norms against its reference implementation, sbx-rl.

Trains the reference (`sbx.CrossQ`, JAX/Flax, with its own BatchRenorm) and
examples/crossq.py's `crossq_brn` (Keras 3 with keras_norms) on Pendulum-v1
with the same recipe: the same environment steps, seeds, critic width,
the same BRN switch (plain BN for the first tenth of the updates, then
`rmax=3`, `dmax=5`; both count a layer's training calls), batch 256, 100
random steps first, Adam 1e-3 with `beta_1=0.5`, one actor update per 3
critic updates, and the same deterministic evaluation (5 episodes, the same
seeds) every `--eval-every` steps. Prints both side by side: the return at
each checkpoint (mean ± std and the reference's range over the seeds, and
whether the Keras mean lies within that range) and the wall time of
training per update (environment steps and updates, evaluation excluded,
after the first checkpoint, which includes compiling), measured in one run
on one backend (JAX: the reference's).

sbx-rl is an optional extra, not a dependency of keras_norms:

    pip install sbx-rl gymnasium
    KERAS_BACKEND=jax python benchmarks/crossq_reference.py   # 5 seeds
    KERAS_BACKEND=jax python benchmarks/crossq_reference.py --seeds 0 \
        --steps 1000 --critic-width 256                       # a smoke run

Both implementations run in this one process, one after the other for each
seed (the reference first), so that a slower or busier moment of the
machine falls on both.
"""

import argparse
import json
import os
import sys
import time

import gymnasium as gym
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import crossq  # noqa: E402  examples/crossq.py


def train_reference(seed, steps, critic_width, switch, eval_every, episodes):
    from sbx import CrossQ

    updates = steps - crossq.LEARNING_STARTS
    model = CrossQ(
        "MlpPolicy",
        gym.make("Pendulum-v1"),
        learning_starts=crossq.LEARNING_STARTS,
        batch_size=crossq.BATCH_SIZE,
        gamma=crossq.GAMMA,
        policy_delay=3,
        policy_kwargs=dict(
            net_arch=dict(pi=[crossq.ACTOR_WIDTH] * 2, qf=[critic_width] * 2),
            batch_norm_momentum=0.99,
            renorm_warmup_steps=round(switch * updates),
        ),
        seed=seed,
    )
    curve, seconds = [], []
    for done in range(eval_every, steps + 1, eval_every):
        start = time.perf_counter()
        model.learn(eval_every, reset_num_timesteps=done == eval_every)
        seconds.append(time.perf_counter() - start)
        # The policy's actions are in the environment's bounds already.
        value = crossq.evaluate(
            lambda obs: model.predict(obs, deterministic=True)[0],
            10_000 + 100 * seed,
            episodes,
        )
        curve.append((done, value))
        print(f"reference  seed {seed} step {done:5d} return {value:8.1f}")
    return {
        "variant": "reference",
        "seed": seed,
        "steps": [s for s, _ in curve],
        "returns": [r for _, r in curve],
        "ms_per_update": 1000
        * sum(seconds[1:])
        / (eval_every * len(seconds[1:])),
    }


def side_by_side(keras_runs, reference_runs):
    checkpoints = keras_runs[0]["steps"]
    ours = np.array([r["returns"] for r in keras_runs])
    ref = np.array([r["returns"] for r in reference_runs])
    lines = [
        "| step | keras_norms | reference | reference range | within |",
        "| --- | --- | --- | --- | --- |",
    ]
    within = []
    for i, step in enumerate(checkpoints):
        low, high = ref[:, i].min(), ref[:, i].max()
        inside = bool(low <= ours[:, i].mean() <= high)
        within.append(inside)
        lines.append(
            f"| {step} | {ours[:, i].mean():.0f} ± {ours[:, i].std():.0f} "
            f"| {ref[:, i].mean():.0f} ± {ref[:, i].std():.0f} "
            f"| {low:.0f} to {high:.0f} | {'yes' if inside else 'no'} |"
        )
    ms_ours = np.median([r["ms_per_update"] for r in keras_runs])
    ms_ref = np.median([r["ms_per_update"] for r in reference_runs])
    lines.append("")
    lines.append(
        f"training time per update (median over the seeds): keras_norms "
        f"{ms_ours:.1f} ms, reference {ms_ref:.1f} ms, "
        f"ratio {ms_ours / ms_ref:.2f}x"
    )
    return "\n".join(lines), all(within), ms_ours / ms_ref


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=crossq.EVAL_EPISODES)
    parser.add_argument("--critic-width", type=int, default=256)
    parser.add_argument("--switch", type=float, default=0.1)
    parser.add_argument("--json", help="write both runs' records here")
    parser.add_argument(
        "--from",
        dest="records",
        nargs="+",
        help="print the comparison of earlier --json runs, seeds merged",
    )
    args = parser.parse_args(argv)
    if args.records:
        keras_runs, reference_runs = [], []
        for path in args.records:
            with open(path) as f:
                record = json.load(f)
            keras_runs += record["keras_norms"]
            reference_runs += record["reference"]
        seeds = sorted(r["seed"] for r in keras_runs)
        print(f"seeds {','.join(map(str, seeds))}")
        print(side_by_side(keras_runs, reference_runs)[0])
        return
    if crossq.keras.backend.backend() != "jax":
        raise ValueError(
            "Run with KERAS_BACKEND=jax: the reference is a JAX program and "
            "the times are compared on one backend."
        )
    keras_runs, reference_runs = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        common = (seed, args.steps, args.critic_width, args.switch)
        reference_runs.append(
            train_reference(*common, args.eval_every, args.episodes)
        )
        keras_runs.append(
            crossq.train(
                "crossq_brn", *common, args.eval_every, args.episodes, print
            )
        )
    text, within, ratio = side_by_side(keras_runs, reference_runs)
    print(
        f"\nPendulum-v1, critic width {args.critic_width}, seeds {args.seeds}"
    )
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "recipe": vars(args),
                    "keras_norms": keras_runs,
                    "reference": reference_runs,
                    "within_reference_range": within,
                    "time_ratio": ratio,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
