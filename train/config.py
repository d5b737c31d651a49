"""TrainConfig: every knob of a fine-tuning run in one dataclass, with the course's defaults."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

# "adamw": train/optim.py's written-out AdamW; "torch_adamw": torch's, the reference it equals
OPTIMIZERS = ("adamw", "torch_adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Hyperparameters of `train.train`.

    One optimizer step consumes `batch_size * grad_accum` examples (the global batch, whatever the
    number of processes), or with `packing` as many rows of max_len tokens, each filled with whole
    examples; the loss is normalised by the answer tokens of that whole step.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0            # the course uses 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 1
    max_steps: int | None = None         # overrides epochs when set
    batch_size: int = 8                  # examples per micro-batch (split across processes under DDP)
    grad_accum: int = 1                  # micro-batches per optimizer step
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None      # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0            # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float | None = 1.0    # None: no clipping
    eval_every: int | None = None        # steps; the validation loss is also taken at the end
    save_every: int | None = None        # steps; needs out_dir
    keep_last: int | None = None         # checkpoints kept; None keeps all
    log_every: int = 1
    optimizer: str = "adamw"
    grad_checkpointing: bool | str = False  # True: recompute each layer in backward; "offload": its input waits on the host
    compile: bool = False                # torch.compile each decoder layer (Llama.compile_layers)
    seed: int = 42
    out_dir: str | None = None
    device: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 on CUDA; torch.float16 (loss-scaled) without bf16
    fp16_init_scale: float = 2.0 ** 16   # fp16 only: the first loss scale S
    fp16_growth_interval: int = 2000     # fp16 only: clean steps before S doubles
    max_len: int | None = None           # tokens an example may hold: a (prompt, answer) pair loses prompt
                                         # tokens on the left (the answer kept whole, or the pair skipped);
                                         # an Example (e.g. train.chat_example) keeps its first max_len tokens,
                                         # its end cut (Example.cut); with packing, also a row's length
    group_by_length: bool = False        # length-bucketed batches: less padding, same epoch coverage
    packing: bool = False                # fill rows of max_len tokens with whole examples (train/packing.py);
                                         # batch_size then counts rows; group_by_length has no effect;
                                         # validation stays unpacked (sorted by length, no backward pass)
    run_name: str | None = None          # None: the start date and time
    progress: bool = True                # tqdm bar on stderr
    add_eos: bool = True                 # end each answer with EOS so the model learns to stop
    parallel: str = "ddp"                # under torchrun: "ddp" copies the model, "fsdp" shards it (train/fsdp.py)

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum", "log_every", "fp16_growth_interval"):
            positive(name)
        for name in ("max_steps", "eval_every", "save_every", "keep_last", "max_len"):
            positive(name, allow_none=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"TrainConfig.parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if not (isinstance(self.grad_checkpointing, bool) or self.grad_checkpointing == "offload"):
            raise ValueError(f"TrainConfig.grad_checkpointing must be False, True or 'offload', got {self.grad_checkpointing!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must lie in [0, 1], got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm!r}")
        if self.packing and self.max_len is None:
            raise ValueError("TrainConfig.packing fills rows of max_len tokens: set max_len (e.g. 512), the length of "
                             "a packed row")
        if self.parallel == "fsdp" and self.out_dir is None:
            raise ValueError("TrainConfig.parallel='fsdp' needs out_dir: the sharded model's adapter is gathered into "
                             "its last checkpoint-<step>/")
        if self.save_every is not None and self.out_dir is None:
            raise ValueError("TrainConfig.save_every needs out_dir: set out_dir to the folder for checkpoint-<step>/")
        if self.autocast_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"TrainConfig.autocast_dtype must be None, torch.bfloat16 or torch.float16, got {self.autocast_dtype!r}")
        if not (self.fp16_init_scale > 0 and math.isfinite(self.fp16_init_scale)):
            raise ValueError(f"TrainConfig.fp16_init_scale must be a positive number, got {self.fp16_init_scale!r}")
        self.betas = tuple(self.betas)

    def warmup_for(self, total_steps: int) -> int:
        """Warmup length in steps: warmup_steps if set, else ceil(warmup_ratio · total), never past the end."""
        warmup = self.warmup_steps if self.warmup_steps is not None else math.ceil(self.warmup_ratio * total_steps)
        return min(warmup, total_steps)

    def summary(self) -> dict[str, Any]:
        """Plain values (str/int/float/bool) for the TensorBoard hyperparameter table."""
        out = {}
        for k, v in asdict(self).items():
            out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out
