"""The `train` and `eval` sections."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from sdflow.config.base import Precision, Section
from sdflow.config.distributed import DistributedTraining
from sdflow.config.prior import PriorPreservation
from sdflow.config.tags import TagsAndMasks

LrSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler decays `polynomial` to this lr


class FlowConfig(Section):
    """Rectified-flow training (the sd3 and flux families): how sigmas are drawn and weighted."""

    timesteps: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal",
        description="density of u in [0, 1] (timestep index u x 1000): uniform, logit_normal "
        "(sigmoid of a normal draw; Esser et al. 2024) or mode (heavier mid-range, mode_scale)",
    )
    logit_mean: float = Field(0.0, description="mean of logit_normal's normal draw")
    logit_std: float = Field(1.0, gt=0, description="std of logit_normal's normal draw")
    mode_scale: float = Field(1.29, description="scale of the mode density")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="loss weight per sample: none, sigma_sqrt (sigma^-2) or cosmap"
    )
    shift: float | None = Field(
        None, gt=0, description="sigma shift of the schedule; unset: the base scheduler's own"
    )


class TrainConfig(DistributedTraining, TagsAndMasks):
    """UNet training: from scratch, full fine-tune, or LoRA."""

    mode: Literal["full", "lora"] = "full"
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(
        16,
        ge=1,
        description="samples per process and micro-batch; the global batch is batch_size x "
        "processes x gradient_accumulation",
    )
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    lr_scheduler: LrSchedule = Field(
        "constant",
        description="diffusers lr schedule; every one but `constant` starts with `warmup_steps` "
        "of linear warmup from 0",
    )
    warmup_steps: int = Field(0, ge=0, description="needs a schedule with warmup (not constant)")
    lr_cycles: int = Field(1, ge=1, description="hard restarts of cosine_with_restarts")
    lr_power: float = Field(1.0, gt=0, description="power of the polynomial decay (1: linear)")
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR weighting gamma, e.g. 5.0")
    noise_offset: float = Field(0.0, ge=0, le=1)
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None,
        description="unset: the pretrained model's own (its scheduler config), epsilon from "
        "scratch; set to something else than the base's only to re-target it (logged, recorded)",
    )
    caption_dropout: float = Field(0.0, ge=0, le=1)
    flow: FlowConfig = Field(
        default_factory=FlowConfig, description="rectified-flow settings (sd3, flux families)"
    )
    guidance_scale: float = Field(
        1.0, ge=0, description="Flux's guidance embedding input during training (flux only)"
    )
    use_flipped: bool = Field(True, description="sample flipped latents when cached")
    cache_latents: bool = Field(True, description="false: encode with VAE/text encoder every step")
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: equal to lora_rank")
    lora_type: Literal["lora", "dora", "lokr", "loha"] = Field(
        "lora",
        description="the adapter (PEFT): lora, dora (LoRA with a magnitude vector), lokr "
        "(Kronecker factors), loha (Hadamard product); lora and dora load with diffusers' "
        "load_lora_weights, lokr and loha are exported in PEFT's format",
    )
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="fine-tunes only: frozen (its embeddings are cached), lora (rank lora_rank on "
        "its attention projections; needs mode lora) or full (needs mode full); a trained encoder "
        "runs at every step on cached token ids",
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, le=1, description="the text encoder's lr when it trains; default: train.lr"
    )
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="per node: 1 (and train.nodes 1) trains in the stage's process; more: "
        "torchrun starts that many (one per GPU, or gloo on CPU); auto: one per visible GPU",
    )
    data_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes; 0 loads in the training process"
    )
    pin_memory: bool = Field(
        False, description="DataLoader pinned host memory (faster copies to a GPU; none on CPU)"
    )
    prefetch_factor: int | None = Field(
        None,
        ge=1,
        le=64,
        description="batches each DataLoader worker loads ahead; needs data_workers",
    )
    channels_last: bool = Field(
        False,
        description="UNet weights and inputs in channels-last memory format (GPU tensor cores)",
    )
    attention: Literal["default", "sdpa", "eager"] = Field(
        "default",
        description="UNet attention processor: default (as loaded), sdpa (PyTorch "
        "scaled_dot_product_attention, AttnProcessor2_0) or eager (plain matmul and softmax)",
    )
    fused_adamw: bool | None = Field(
        None,
        description="torch's fused AdamW kernel (one kernel over all weights); unset: fused where "
        "torch has the kernel for the device, else foreach; true: fused or refuse; adamw only",
    )
    tf32: bool = Field(
        False, description="TF32 matmuls and convolutions on CUDA (Ampere or newer); no-op on CPU"
    )
    compile: bool = Field(False, description="torch.compile the UNet (inductor; slow first steps)")

    validate_every: int = Field(
        0,
        ge=0,
        description="steps between validations (held-out loss and sample grid); 0: none. Needs "
        "held-out samples (eval.held_out_fraction > 0) and cache_latents",
    )
    validation_samples: int = Field(
        64, ge=1, description="held-out rows (in cache order) the validation loss averages over"
    )
    validation_prompts: list[str] = Field(
        default_factory=list, description="prompts of the validation grid; empty: held-out captions"
    )
    validation_images: int = Field(
        4, ge=0, description="held-out captions in the grid when validation_prompts is empty"
    )
    validation_inference_steps: int = Field(
        10, ge=1, description="sampler steps per validation image (kept low: it runs often)"
    )
    keep_best: bool = Field(
        False,
        description="keep the checkpoint of the lowest validation loss and export it as the "
        "model (the last one is exported beside it)",
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without a lower loss"
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = Field(
        "adamw",
        description="adamw8bit: bitsandbytes' 8-bit AdamW, CUDA only (extra 'gpu'); prodigy: "
        "Prodigy's step-size estimation (train.lr 1.0 recommended, 0.1-1); adafactor: "
        "transformers' Adafactor with a fixed lr (factored second moments)",
    )
    prodigy_d_coef: float = Field(
        1.0, gt=0, description="prodigy: scale of its step-size estimate (lower: more cautious)"
    )
    master_weights: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="full fine-tunes: the trained weights as kept between steps: float32 (mixed "
        "precision's master copy) or bfloat16 (no float32 copy: weights and gradients in bf16, "
        "each tensor stepped in float32 and rounded back stochastically; needs mixed_precision "
        "bf16, no EMA; sdflow.training.master_weights)",
    )
    ema_on_cpu: bool = Field(
        False, description="keep the EMA weights in CPU memory (saves GPU memory, costs copies)"
    )
    keep_optimizer_state: bool = Field(
        False,
        description="false: the finished stage's checkpoint keeps weights, EMA, step, lr schedule "
        "and random state (enough to train on) but not the optimizer moments (2x the trained "
        "weights); checkpoints during training always hold them, for exact resume",
    )

    export_formats: list[Literal["diffusers", "single_file", "kohya"]] = Field(
        default_factory=lambda: ["diffusers"],
        description="exports beside the diffusers folder (always written): single_file (full "
        "fine-tunes and scratch runs: one .safetensors in the original SD / SDXL key layout for "
        "A1111, ComfyUI, Forge) and kohya (LoRA runs: the adapter in kohya's lora_unet_/lora_te_ "
        "names)",
    )
    export_dtype: Literal["float16", "float32", "bfloat16"] = Field(
        "float16", description="dtype of the single_file and kohya exports (diffusers: float32)"
    )
    init_lora: str | None = Field(
        None,
        description="a LoRA file (diffusers or kohya format) the run starts from instead of a "
        "fresh adapter; its rank and alpha come from the file (mode lora)",
    )
    prior_preservation: PriorPreservation | None = Field(
        None, description="DreamBooth class images and prior loss (docs/dreambooth.md); unset: off"
    )

    @model_validator(mode="after")
    def _exports_fit_the_mode(self) -> TrainConfig:
        wrong = {"single_file": "lora", "kohya": "full"}
        for name in self.export_formats:
            if wrong.get(name) == self.mode:
                allowed = "single_file" if self.mode == "full" else "kohya"
                raise ValueError(
                    f"train.export_formats has {name!r} but train.mode is {self.mode!r}; allowed "
                    f"for {self.mode}: diffusers, {allowed}"
                )
        if "diffusers" not in self.export_formats:  # always written; listed so summaries say so
            self.export_formats = ["diffusers", *self.export_formats]
        if self.init_lora and self.mode != "lora":
            raise ValueError(
                f"train.init_lora is {self.init_lora!r} but train.mode is {self.mode!r}: an "
                "adapter file starts a LoRA run; set mode lora or unset init_lora"
            )
        lora_type = getattr(self, "lora_type", "lora")
        if lora_type != "lora" and ("kohya" in self.export_formats or self.init_lora):
            key = "export_formats has 'kohya'" if "kohya" in self.export_formats else "init_lora"
            raise ValueError(
                f"train.{key} but train.lora_type is {lora_type!r}: the kohya export and "
                "init_lora read and write plain LoRA layers; use lora_type 'lora' (a "
                f"{lora_type} run is exported in its own format, see docs/training.md)"
            )
        return self

    @model_validator(mode="after")
    def _bf16_master_weights(self) -> TrainConfig:
        if self.master_weights == "float32":
            return self
        wrong = {"mode": (self.mode, "full"), "mixed_precision": (self.mixed_precision, "bf16"),
                 "ema": (self.ema, False), "sharding": (self.sharding, "none")}  # fmt: skip
        for key, (value, allowed) in wrong.items():
            if value != allowed:
                raise ValueError(
                    f"train.master_weights is 'bfloat16' but train.{key} is {value!r}: bfloat16 "
                    f"master weights are for full fine-tunes in bf16 without EMA (whose average "
                    f"would lose the small updates bf16 cannot hold), unsharded (FSDP has its own "
                    f"precision policy); allowed: {key} {allowed!r}"
                )
        return self

    @model_validator(mode="after")
    def _checkpoint_fits(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"
            )
        if self.lr_scheduler == "constant" and self.warmup_steps > 0:
            # diffusers' constant schedule ignores num_warmup_steps: refuse, never drop it silently
            raise ValueError(
                f"train.lr_scheduler 'constant' has no warmup, but train.warmup_steps is "
                f"{self.warmup_steps}: use lr_scheduler 'constant_with_warmup' (or another of "
                f"{', '.join(get_args(LrSchedule)[1:])}), or warmup_steps 0"
            )
        for key in ("keep_best", "early_stop_patience"):
            if getattr(self, key) not in (None, False) and not self.validate_every:
                raise ValueError(
                    f"train.{key} is {getattr(self, key)!r} but train.validate_every is 0: both "
                    "act on validations, so set validate_every to a number of steps"
                )
        text_encoder = getattr(self, "text_encoder", "frozen")  # train.text_encoder (issue 8 §5)
        if self.validate_every and text_encoder != "frozen":
            raise ValueError(
                f"train.validate_every is {self.validate_every} but train.text_encoder is "
                f"{text_encoder!r}: validation reads the frozen encoder's cached caption embeddings, "
                "so it is not available yet while the text encoder trains; set validate_every 0"
            )
        if self.validate_every and not self.cache_latents:
            raise ValueError(
                f"train.validate_every is {self.validate_every} but train.cache_latents is false: "
                "validation reads the held-out rows the latents stage caches; set cache_latents"
            )
        if self.prefetch_factor is not None and not self.data_workers:
            raise ValueError(
                f"train.prefetch_factor is {self.prefetch_factor} but train.data_workers is 0: "
                "only worker processes load ahead; set data_workers >= 1 or unset prefetch_factor"
            )
        if self.fused_adamw and self.mixed_precision == "fp16":
            raise ValueError(
                "train.fused_adamw is true but train.mixed_precision is 'fp16': the fused kernel "
                "skips inf/NaN steps out of accelerate's sight, so the lr schedule and EMA would "
                "not wait; leave fused_adamw unset (foreach under fp16) or use bf16"
            )
        if self.fused_adamw and self.optimizer != "adamw":
            raise ValueError(
                f"train.fused_adamw is true but train.optimizer is {self.optimizer!r}: the fused "
                "kernel is torch's AdamW; use optimizer 'adamw' or fused_adamw false"
            )
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise ValueError(
                f"train.optimizer is 'prodigy' but train.lr is {self.lr}: Prodigy estimates the "
                "step size itself and train.lr multiplies its estimate; use 1.0 (recommended) or "
                "down to 0.1, not an AdamW learning rate"
            )
        if self.lora_type != "lora" and self.mode != "lora":
            raise ValueError(
                f"train.lora_type is {self.lora_type!r} but train.mode is {self.mode!r}: adapter "
                "types apply to mode 'lora'"
            )
        if self.lr_scheduler == "polynomial" and self.lr <= POLYNOMIAL_LR_END:
            raise ValueError(
                f"train.lr_scheduler 'polynomial' decays to {POLYNOMIAL_LR_END}, so train.lr "
                f"({self.lr}) must be larger than that"
            )
        return self


class EvalConfig(Section):
    """Sampling and metrics after training."""

    held_out_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of samples (by id) kept out of training, for FID"
    )
    prompts: list[str] = Field(default_factory=list, description="empty: held-out captions")
    num_prompts: int = Field(16, ge=1, description="held-out captions to use when prompts is empty")
    images_per_prompt: int = Field(1, ge=1, description="grid columns per model and prompt")
    seed: int = Field(0, description="image j of prompt i is sampled with seed + i*1000 + j")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance; <= 1: none")
    scheduler: Literal["ddim", "ddpm", "euler", "dpm"] = Field(
        "ddim", description="sampler: DDIM, DDPM, Euler, or DPM-Solver++ (multistep)"
    )
    fid_features: Literal["inception", "random-cnn"] = Field(
        "inception",
        description="inception: standard FID (torch-fidelity weights in the torch hub cache); "
        "random-cnn: offline, comparable only between sdflow runs",
    )
    fid_samples: int = Field(256, ge=2, description="generated and real images compared by FID")
    clip_model: str | None = Field(
        None, description="CLIP model directory or hub name for CLIPScore; unset: no CLIP score"
    )
    batch_size: int = Field(32, ge=1, description="images generated per pipeline call")
    baseline: bool = Field(
        True,
        description="also evaluate the starting model (scored once per base model and eval "
        "settings, in stages/baseline/, and reused)",
    )
    nearest_k: int = Field(
        5, ge=1, description="k of the k-nearest-neighbour precision/recall/density/coverage"
    )
    checkpoints: Literal["final", "best", "all"] = Field(
        "final",
        description="final: score the last training step's model (with train.keep_best its "
        "final-pipeline/final-lora); best: the lowest-validation-loss checkpoint's model "
        "(needs train.keep_best); all: final and every checkpoint the train stage kept, with a "
        "metric-vs-step curve",
    )
