"""Sparse dictionaries: SAEs and transcoders, as SAELens folders, and what their latents mean.

    kinds.py            what kind of dictionary this is (SAE or transcoder), where it reads, where its
                        output belongs, its latents and its prediction: the one answer every stage asks
    io.py               SAELens folders: save (activation scales folded in), find, load
    transcoders.py      transcoder training classes, registered with SAELens; layerflow's TopK ones
    top_activations.py  each latent's top-activating held-out tokens, in fixed memory, and their contexts
"""

from layerflow.dictionaries.io import find_sae_folders, load_saes, sae_metadata, save_sae
from layerflow.dictionaries.kinds import (ARCHITECTURES, SAE_ARCHITECTURES, TRANSCODER_ARCHITECTURES, encode,
                                          input_hook, is_transcoder, matryoshka_widths, output_hook, predict)
from layerflow.dictionaries.top_activations import TopActivations, contexts, token_text, top_activations

__all__ = ["ARCHITECTURES", "SAE_ARCHITECTURES", "TRANSCODER_ARCHITECTURES", "TopActivations", "contexts", "encode",
           "find_sae_folders", "input_hook", "is_transcoder", "load_saes", "matryoshka_widths", "output_hook",
           "predict", "sae_metadata", "save_sae", "token_text", "top_activations"]
