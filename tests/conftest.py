"""Shared fixtures: an isolated Prefect home and test server, and the demo dataset.

PREFECT_HOME is set before anything imports Prefect, so results and the database of the test
session never leak into ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["fixtures.clip", "fixtures.sd3", "fixtures.flux"]  # tiny CLIP, SD3, Flux

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sdflow-test-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# The longest modules, longest first (minutes of one core, measured in `make test`). `make test`
# runs pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands whole modules to the
# workers in collection order: started first, they run side by side instead of one of them being
# left for last (by default xdist starts the modules with the most tests first, and a one-test
# module of 5 minutes last).
LONGEST_FIRST = [
    "tests/flows/test_profile_runs.py",
    "tests/flows/test_profile_runs_flow.py",
    "tests/flows/test_finetune_learns.py",
    "tests/flows/test_sweep.py",
    "tests/flows/test_pipeline.py",
    "tests/flows/test_chaos.py",
    "tests/flows/test_server.py",
    "tests/flows/test_dask.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    if missing := [path for path in LONGEST_FIRST if not (root / path).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names missing files: {missing}")

    def position(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(root).as_posix(), len(rank))

    items.sort(key=position)  # stable: every module's tests keep their order


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """A small demo dataset in the `folder` layout (same generator as `sdflow demo`)."""
    from sdflow.data.sources.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo-data", count=240, seed=0)


@pytest.fixture()
def one_torch_thread():
    """Tiny models run fastest on one thread, and bitwise comparisons need the same CPU kernels in
    every run; more threads only contend with the other processes of a test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_SDXL_CAPTIONS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a grey background",
    "two yellow squares",
]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny `StableDiffusionXLPipeline` built from config (seeded) and saved: what a pretrained
    SDXL looks like. UNet with `addition_embed_type: text_time`, `text_encoder` (CLIPTextModel) and
    `text_encoder_2` (CLIPTextModelWithProjection), tokenizers trained on a few captions (no
    download), the tiny-test VAE (32 px images, 8 px latents) and SDXL's Euler scheduler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdflow.models.components import build_vae, train_tokenizer
    from sdflow.profiles import load_profile

    root = tmp_path_factory.mktemp("tiny-sdxl")
    model = load_profile("tiny-test").model
    tokenizer = train_tokenizer(TINY_SDXL_CAPTIONS * 4, model, root / "tokenizer")
    text = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=model.max_token_length, projection_dim=32)  # fmt: skip
    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text["projection_dim"],
            cross_attention_dim=2 * text["hidden_size"],  # both encoders' states, concatenated
            norm_num_groups=8,
        )
        encoder = CLIPTextModel(CLIPTextConfig(**text))
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(model), text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def save_tiny_sd(root: Path, v_prediction: bool) -> Path:
    """A tiny `StableDiffusionPipeline` from the tiny-test components (seeded), saved: what a
    pretrained SD 1.5 (PNDM, epsilon) or, with `v_prediction`, SD 2.1 (DDIM predicting v, a gelu
    text encoder) looks like."""
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from sdflow.models.components import build_text_encoder, build_unet, build_vae, train_tokenizer
    from sdflow.profiles import load_profile

    model = load_profile("tiny-test").model
    tokenizer = train_tokenizer(TINY_SDXL_CAPTIONS * 4, model, root / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae = build_unet(model), build_vae(model)
        encoder = build_text_encoder(model, len(tokenizer))
        if v_prediction:
            encoder.config.hidden_act = "gelu"  # SD 2.x's OpenCLIP text tower
            encoder = CLIPTextModel(encoder.config)
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if v_prediction:
        scheduler = DDIMScheduler(
            **betas,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    else:
        scheduler = PNDMScheduler(**betas, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd15"), v_prediction=False)


@pytest.fixture(scope="session")
def tiny_sd21(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd21"), v_prediction=True)


# Tiny random caption models saved like pretrained ones (tests/captioners, tests/flows).
WORDS = ["a", "photograph", "of", "zebra", "quartz", "violet", "ember", "lagoon", "maple"]
TERMS = {
    "artists.txt": ["Claude Monet", "Pablo Picasso", "Hokusai"],
    "flavors.txt": ["sharp focus", "highly detailed", "soft light", "blurry", "4k", "grainy"],
    "mediums.txt": ["oil painting", "charcoal drawing", "watercolor"],
    "movements.txt": ["impressionism", "cubism", "ukiyo-e"],
    "negative.txt": ["ugly", "text", "watermark"],
}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def caption_words() -> list[str]:
    """The tiny caption models' whole vocabulary (special tokens aside)."""
    return WORDS


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BLIP whose captions are words of WORDS (special tokens banned: never empty)."""
    out = tmp_path_factory.mktemp("captioners") / "blip"
    from sdflow.data.captioners.random_init import save_random_blip, tiny_blip_config

    return save_random_blip(out, tiny_blip_config(len(WORDS) + 6), WORDS)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random open_clip model (ViT, 32 px) as a local directory. Its short text context (24
    tokens) ends clip-interrogator's term chains early: they grow until the prompt fills it."""
    from sdflow.data.captioners.random_init import save_random_open_clip

    return save_random_open_clip(tmp_path_factory.mktemp("captioners") / "clip", TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_clip_77(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_clip` with ViT-L-14's 77-token text context: room for a 32-token BLIP caption and
    the terms clip-interrogator appends (a profile's own caption length)."""
    from sdflow.data.captioners.random_init import save_random_open_clip

    text_cfg = TINY_CLIP["text_cfg"] | {"context_length": 77}
    out = tmp_path_factory.mktemp("captioners") / "clip-77"
    return save_random_open_clip(out, TINY_CLIP | {"text_cfg": text_cfg})


@pytest.fixture(scope="session")
def term_lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("terms")
    for name, terms in TERMS.items():
        (out / name).write_text("\n".join(terms) + "\n")
    return out
