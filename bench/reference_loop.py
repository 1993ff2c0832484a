"""A minimal equivalent of diffusers' `examples/text_to_image/train_text_to_image.py` training loop.

Written from reading that script (not copied), for `bench/train_step.py --vs-reference`: the same
per-step work on the same pretrained pipeline folder, in the same order:

- data: an imagefolder (`images/*.png` + `metadata.jsonl`) whose rows are decoded and transformed
  per access (the script's `dataset.with_transform(preprocess_train)`): RGB, Resize (bilinear),
  CenterCrop, RandomHorizontalFlip, ToTensor, Normalize([0.5], [0.5]), and the caption tokenized
  (max_length padding); a shuffled `DataLoader` whose collate stacks pixels and ids;
- each step, inside `accelerator.accumulate(unet)`: the frozen VAE encodes the batch and samples its
  latent distribution (times `scaling_factor`), the frozen text encoder embeds the ids, `randn_like`
  noise, uniform integer timesteps, `add_noise`, the UNet forward, MSE on the noise (epsilon),
  the gathered loss `.item()` for logging, backward, grad-norm clipping, AdamW step, lr scheduler
  step, `zero_grad`; then EMA when on, the progress bar, `accelerator.log` (TensorBoard) and the
  bar's postfix with the step loss (another `.item()`).

Returns the time at the end of each step (model set-up excluded; no checkpoint falls in a short run).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer


class ImageFolder(Dataset):
    """imagefolder rows, transformed on access (as `with_transform` does)."""

    def __init__(self, root: Path, tokenizer: CLIPTokenizer, resolution: int):
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
        self.files = [(root / r["file_name"]).read_bytes() for r in rows]
        self.captions = [r["caption"] for r in rows]
        self.tokenizer = tokenizer
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = Image.open(io.BytesIO(self.files[index])).convert("RGB")
        ids = self.tokenizer(
            [self.captions[index]],
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": self.transform(image), "input_ids": ids[0]}


def collate_fn(examples: list[dict]) -> dict:
    pixels = torch.stack([e["pixel_values"] for e in examples])
    pixels = pixels.to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixels, "input_ids": torch.stack([e["input_ids"] for e in examples])}


def reference_step_ends(
    pipeline: Path,
    data: Path,
    out_dir: Path,
    steps: int,
    batch_size: int,
    resolution: int,
    ema: bool = False,
    seed: int = 0,
) -> list[float]:
    """Run `steps` steps of the reference loop; `time.perf_counter()` at the end of each."""
    torch.manual_seed(seed)
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs"))
    accelerator = Accelerator(log_with="tensorboard", project_config=project)
    noise_scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel) if ema else None
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    dataset = ImageFolder(data, tokenizer, resolution)
    loader = DataLoader(dataset, shuffle=True, collate_fn=collate_fn, batch_size=batch_size)
    lr_scheduler = get_scheduler(
        "constant", optimizer, num_warmup_steps=0, num_training_steps=steps
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    if ema_unet:
        ema_unet.to(accelerator.device)
    accelerator.init_trackers("text2image-fine-tune", config={"steps": steps})
    progress_bar = tqdm(range(steps), file=io.StringIO())  # drawn, but not onto the terminal
    global_step, train_loss, ends = 0, 0.0, []
    while global_step < steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(batch_size)).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if ema_unet:
                    ema_unet.step(unet.parameters())
                progress_bar.update(1)
                global_step += 1
                accelerator.log({"train_loss": train_loss}, step=global_step)
                train_loss = 0.0
            logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
            ends.append(time.perf_counter())
            if global_step >= steps:
                break
    accelerator.end_training()
    return ends
