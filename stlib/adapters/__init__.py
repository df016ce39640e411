"""Adapters that fine-tune a pretrained State Transition model: LoRA (through peft) and mHC (ours).

Import from the submodules: `stlib.adapters.lora`, `stlib.adapters.mhc`.
"""
