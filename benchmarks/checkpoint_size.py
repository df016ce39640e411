"""What one LoRA fine-tune checkpoint of an ST-Tahoe-shaped base holds, without training: counts and bytes.

Builds the base at the shape State's ST-Tahoe has (hidden 1488, 4-layer encoders, 6 LLaMA layers of 12 heads × 124,
FFN 5952, 2,000-d input, the unused 32000-row token embedding, a gene decoder for 2,000 genes), adds what a fine-tune adds (a new perturbation column,
LoRA r=16 on q/k/v/o, the perturbation encoder and gene decoder trained in full) and prints the base's size beside
what a lean checkpoint stores: the trained tensors and their two AdamW moments. `--mhc` adds 4-stream mHC.
"""

from __future__ import annotations

import argparse

import torch

from stlib.adapters.lora import apply_lora, trained_keys
from stlib.adapters.mhc import apply_mhc
from stlib.config import DecoderConfig, LoraConfig, MHCConfig, ModelConfig
from stlib.models.state_transition import StateTransitionModel

TAHOE = ModelConfig(hidden_dim=1488, n_layers=6, n_heads=12, head_dim=124, intermediate_size=5952, n_encoder_layers=4,
                    n_decoder_layers=4, residual_space="hidden", output_relu=True, cell_set_len=512,
                    embed_vocab_size=32000)  # State keeps an unused 32000-row token embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mhc", action="store_true")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perts", type=int, default=380, help="the base's perturbation columns (Tahoe: ~380 drugs)")
    args = parser.parse_args()
    model = StateTransitionModel(TAHOE, input_dim=2000, pert_dim=args.perts, gene_dim=args.genes,
                                 decoder=DecoderConfig(hidden=[1024, 1024, 512], softplus=False, skip=False))
    base_params = sum(p.numel() for p in model.parameters())
    model.extend_perturbations(args.perts + 1)  # Burn
    if args.mhc:
        model = apply_mhc(model, MHCConfig(enable=True))
    model = apply_lora(model, LoraConfig(enable=True, modules_to_save=["pert_encoder", "gene_decoder"]))
    keys = trained_keys(model)
    state = model.state_dict()
    trained = sum(state[k].numel() for k in keys)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mib = 2**20
    print(f"base: {base_params / 1e6:.1f} M parameters, {base_params * 4 / mib:.0f} MiB of float32 weights")
    print(f"lean checkpoint: {trained / 1e6:.2f} M trained tensors ({trainable / 1e6:.2f} M trainable parameters); "
          f"weights + 2 AdamW moments ~ {(trained + 2 * trainable) * 4 / mib:.0f} MiB per step checkpoint")
    print(f"a full checkpoint would hold ~ {(sum(v.numel() for v in state.values()) + 2 * trainable) * 4 / mib:.0f} MiB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
