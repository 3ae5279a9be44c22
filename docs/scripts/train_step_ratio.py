"""k-WTA / ReLU train-step time on this machine (docs/training.md, "Measured cost"): one
jitted Adam step (`kwta_jax.training.time_train_step`, random data, compilation excluded) of
the MLP and of the CNN with k-WTA in the dense layer (experiment 1) and in every layer
(experiment 3: ``--kwta-scope all --conv-ratio 0.7``). The configs of one model interleave
trial by trial; a ratio is the median over trials of ``kwta[t] / relu[t]``. Prints one line
per model with the load average at the start and the end.

    python docs/scripts/train_step_ratio.py [--trials 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from kwta_jax.config import TrainConfig
from kwta_jax.training import time_train_step

CASES = {
    "mlp": TrainConfig(model="mlp", batch_size=128),
    "cnn (exp. 1)": TrainConfig(model="cnn", dataset="cifar10", batch_size=128),
    "cnn (exp. 3)": TrainConfig(
        model="cnn", dataset="cifar10", batch_size=128, kwta_scope="all", conv_ratio=0.7
    ),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}")
    for name, config in CASES.items():
        relu = dataclasses.replace(config, act="relu")
        kwta = dataclasses.replace(config, act="kwta")
        t_relu, t_kwta = np.array(
            time_train_step([relu, kwta], n_steps=args.steps, trials=args.trials)
        )
        ratios = t_kwta / t_relu
        print(
            f"{name:14s} k-WTA/ReLU {np.median(ratios):.2f}x (trials {ratios.min():.2f}-"
            f"{ratios.max():.2f}); ms/step relu {np.median(t_relu):.2f}, "
            f"k-WTA {np.median(t_kwta):.2f}",
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
