"""Train the Fashion-MNIST domain classifier shipped for class accuracy and FD-domain.

Run: python benchmarks/train_classifier.py [--epochs 3] [--out src/stepcache/zoo/weights/fmnist-classifier]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.zoo.classifier import WEIGHTS, train_fashion_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=WEIGHTS / "fmnist-classifier")
    args = ap.parse_args()

    def progress(done: int, total: int) -> None:
        if done % 200 == 0 or done == total:
            print(f"{done}/{total}", flush=True)

    print(train_fashion_classifier(args.out, epochs=args.epochs, progress=progress))


if __name__ == "__main__":
    main()
