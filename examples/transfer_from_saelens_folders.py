"""A transfer matrix from SAELens SAE folders: the SAE of site i applied to site j's activations.

Any folder of SAELens SAE folders works (each holding cfg.json and sae_weights.safetensors, as
`SAE.save_model` writes them), with a layerflow capture of the same model for the held-out
activations. By default this reads what examples/capture_and_train.py wrote.

    python examples/transfer_from_saelens_folders.py [--saes artifacts/examples/train/saes]
                                                     [--store artifacts/examples/capture]
"""

import argparse
from pathlib import Path

from layerflow.capture import ActivationStore
from layerflow.dictionaries.io import load_saes
from layerflow.transfer import TransferOptions, sites_of_store, store_calibration, within_model_matrix


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--saes", type=Path, default=Path("artifacts/examples/train/saes"))
    p.add_argument("--store", type=Path, default=Path("artifacts/examples/capture"))
    p.add_argument("--out", type=Path, default=Path("artifacts/examples/transfer"))
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per site")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()

    saes = load_saes(args.saes)  # {hook_name: SAE}, each through sae_lens.SAE.load_from_disk
    store = ActivationStore(args.store)
    sites = sites_of_store(store, list(saes))
    hooks = [s.hook_name for s in sites]
    activations = store.heldout(hooks, max_tokens=512 if args.quick else args.tokens)
    calibration = store_calibration(store, hooks, max_tokens=8192)  # each site's mean and spread, on the train split
    matrix = within_model_matrix(saes, activations, sites, calibration, TransferOptions(max_tokens=None))
    json_path, csv_path = matrix.write(args.out)

    relative = matrix["relative_transfer"]
    print("relative transfer (row: the SAE's layer, column: the layer it explains; 1 = as well as that layer's own SAE)")
    print("        " + "".join(f"{t.layer:>8d}" for t in matrix.targets))
    for i, source in enumerate(matrix.sources):
        print(f"{source.layer:>8d}" + "".join(f"{v:8.3f}" for v in relative[i]))
    print(f"every metric: {json_path} (and {csv_path.name})")


if __name__ == "__main__":
    main()
