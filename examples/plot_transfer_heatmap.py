"""One plot: the transfer heatmap of a matrix, coloured by the notes' bands.

Reads a transfer matrix written by `layerflow transfer`, `layerflow run` or
examples/transfer_from_saelens_folders.py, and draws relative transfer (how well the SAE of the
row's layer explains the column's layer, against that layer's own SAE) as PNG and PDF.

    python examples/plot_transfer_heatmap.py [--matrix artifacts/examples/transfer]
                                             [--out artifacts/examples/transfer_heatmap]
"""

import argparse
from pathlib import Path

from layerflow.report.plots import transfer_heatmap
from layerflow.transfer import TransferMatrix


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--matrix", type=Path, default=Path("artifacts/examples/transfer"),
                   help="transfer_matrix.json, or the folder holding it")
    p.add_argument("--out", type=Path, default=Path("artifacts/examples/transfer_heatmap"),
                   help="file stem: .png and .pdf are added")
    p.add_argument("--metric", default="relative_transfer")
    p.add_argument("--quick", action="store_true", help="accepted for symmetry with the other examples")
    args = p.parse_args()

    matrix = TransferMatrix.read(args.matrix)
    for path in transfer_heatmap(matrix, args.out, metric=args.metric):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
