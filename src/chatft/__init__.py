"""chatft: fine-tune a Hugging Face chat model (full SFT or LoRA), merge the adapter, evaluate.

Importing the package is cheap on purpose: the CLI's `--help` and `steps` commands must not pull in
torch or transformers. Heavy imports live inside the modules that need them.
"""

__version__ = "0.1.0"
