"""DreamBooth on a tiny random Stable Diffusion (conf/model/tiny_sd.yaml, built as diffusers' tests build one):
the dataset and prompts, LoRA training that changes only the adapter, seeded generation, prior preservation, the
DINO/CLIP metric code, the errors a user meets, and `python -m bench` end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from bench.diffusion import DreamBoothModel, find_dreambooth, load_diffusion_model
from bench.models import ModelUnavailableError, load_model
from bench.run import build
from methods.base import WrapContext
from tasks.dreambooth import DreamBoothTask, load_prompt_templates, load_subjects
from tasks.dreambooth_metrics import ImageScorer
from tests.helpers import REPO, compose_cfg, train_steps

LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}  # PROVENANCE.md


@pytest.fixture(scope="module")
def cfg():
    return compose_cfg(["task=dreambooth", "model=tiny_sd", "method=lora", "+experiment=smoke"])


@pytest.fixture(scope="module")
def base(cfg) -> DreamBoothModel:
    torch.manual_seed(0)
    return load_model(cfg.model, DreamBoothTask.head).model


def _task(cfg, **overrides) -> DreamBoothTask:
    return instantiate(OmegaConf.merge(cfg.task, overrides), _convert_="all")


# ---------------------------------------------------------------------------------------------- data and prompts


def test_subjects_prompts_and_photos():
    subjects = load_subjects()
    assert len(subjects) == 30 and {s.name for s in subjects.values() if s.live} == LIVE
    assert subjects["bear_plushie"].class_noun == "stuffed animal"
    assert subjects["pink_sunglasses"].class_noun == "glasses"
    assert sum(len(s.images) for s in subjects.values()) == 158
    for s in subjects.values():
        assert 4 <= len(s.images) <= 6
        with Image.open(s.images[0]) as im:
            assert im.size == (512, 512) and im.mode == "RGB"
    templates = load_prompt_templates()
    assert len(templates["object"]) == len(templates["live"]) == 25
    assert templates["object"][:10] == templates["live"][:10] and templates["object"][10] != templates["live"][10]
    dog, backpack = DreamBoothTask(subject="dog"), DreamBoothTask(subject="backpack")
    assert dog.prompts[0] == "a sks dog in the jungle" and "a sks dog wearing a santa hat" in dog.prompts
    assert "a sks backpack floating on top of water" in backpack.prompts and len(set(backpack.prompts)) == 25
    assert dog.instance_prompt == "a photo of sks dog" and dog.class_prompt == "a photo of dog"
    assert dog.clip_t_text("a sks dog in the snow") == "a dog in the snow"


def test_unknown_subject_lists_every_subject():
    with pytest.raises(ValueError, match="task.subject='dgo'") as err:
        DreamBoothTask(subject="dgo")
    assert all(name in str(err.value) for name in load_subjects())


def test_eval_rows_are_prompts_times_fixed_seeds(cfg):
    task = _task(cfg, max_eval_samples=None, images_per_prompt=3, eval_seed=7)
    rows = task.examples("eval")
    assert len(rows) == 75 and {r["seed"] for r in rows} == {7, 8, 9}
    assert {r["prompt"] for r in rows} == set(task.prompts)
    assert [r["seed"] for r in _task(cfg, images_per_prompt=3, eval_seed=7).examples("eval")] == \
        [r["seed"] for r in _task(cfg, images_per_prompt=3, eval_seed=7).examples("eval")]  # the same subset


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"],
                                     ["to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"]],
                         ids=["unet", "unet+text_encoder"])
def test_lora_trains_only_the_adapter(cfg, base, targets):
    task = _task(cfg)
    method = build(OmegaConf.merge(cfg.method, {"target_modules": targets}), "method", "lora")
    model = method.prepare(copy.deepcopy(base), WrapContext(seed=0))
    rows = task.examples("train")
    loader = DataLoader(rows, batch_size=4, shuffle=True, collate_fn=task.collate_fn(base.tokenizer),
                        generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_steps(model, method, loader, steps=3)
    assert all(np.isfinite(row["loss"]) for row in result.curve)

    trained = find_dreambooth(model)
    assert "vae" not in dict(trained.named_children())  # no method can see the VAE...
    for (name, p), (_, q) in zip(trained.vae.state_dict().items(), base.vae.state_dict().items()):
        assert torch.equal(p, q), name  # ...and it is bit-identical
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and all("lora_" in n for n in trainable)  # every adapter tensor moved, nothing else
    te_adapted = any("text_encoder" in n for n in changed)
    assert te_adapted == ("q_proj" in targets) == trained.text_encoder_trainable()
    merged = method.merge(copy.deepcopy(model))
    if "q_proj" not in targets:  # the text encoder ran without gradients and is untouched
        for (name, p), (_, q) in zip(merged.text_encoder.state_dict().items(), base.text_encoder.state_dict().items()):
            assert torch.equal(p, q), name
    base_params = dict(base.named_parameters())
    for name, layer in method.lora_layers(model).items():
        assert name.startswith(("unet.", "text_encoder.")), name
        assert torch.equal(layer.get_base_layer().weight, base_params[name + ".weight"])  # frozen W0 bit-identical


def test_the_loss_is_the_denoising_mse(base):
    """ε-prediction: loss = mean ‖ε_θ(z_t, t, c) − ε‖² with the noise, timesteps and latents the model draws."""
    model = copy.deepcopy(base)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = model.tokenize(["a photo of sks dog"] * 2)
    torch.manual_seed(3)
    out = model(pixel_values=pixels, input_ids=ids)
    torch.manual_seed(3)  # redo by hand, drawing the same random numbers in the same order
    latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (2,))
    with torch.no_grad():
        pred = model.unet(model.noise_scheduler.add_noise(latents, noise, t), t, model.text_encoder(ids)[0]).sample
    assert out.loss.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)
    assert out.prior_loss is None
    moved = model.to(torch.float64)  # .to() reaches the VAE, which is not a submodule
    assert next(moved.vae.parameters()).dtype == torch.float64


# ---------------------------------------------------------------------------------------------- generation


def test_generation_is_seeded_and_uses_the_adapter(cfg, base):
    model = copy.deepcopy(base)

    def gen(m: DreamBoothModel, seeds: list[int]) -> list[np.ndarray]:
        return [np.asarray(im) for im in m.generate(["a sks dog"] * len(seeds), seeds, 2, 6.0)]

    a = gen(model, [0, 0, 1])
    assert a[0].shape == (32, 32, 3)
    assert np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])  # same seed, same image; not otherwise
    assert all(np.array_equal(x, y) for x, y in zip(gen(model, [0, 0, 1]), a))  # and again in a later call
    method = build(cfg.method, "method", "lora")
    wrapped = find_dreambooth(method.prepare(model, WrapContext(seed=0)))
    assert all(np.array_equal(x, y) for x, y in zip(gen(wrapped, [0, 0, 1]), a))  # LoRA starts at the base (B = 0)
    with torch.no_grad():
        for layer in method.lora_layers(wrapped).values():
            layer.lora_B["default"].weight.normal_(0, 0.5)
    assert not np.array_equal(gen(wrapped, [0, 0, 1])[0], a[0])  # the pipeline runs the adapted UNet


# ---------------------------------------------------------------------------------------------- prior preservation


def test_prior_preservation_batch_and_loss(cfg, base, tmp_path):
    task = _task(cfg, prior_preservation=True, num_class_images=3, prior_loss_weight=0.5,
                 class_cache_dir=str(tmp_path), device="cpu")
    paths = task.class_images(seed=0)
    assert len(paths) == 3
    # the class images come from the frozen base model the run trains (same seed: same random weights), image i
    # from seed i (one generation call, as the task makes them: batched and single calls differ in the last bit)
    expected = base.generate([task.class_prompt] * 3, [0, 1, 2], task.inference_steps, task.guidance_scale,
                             task.resolution)
    for path, image in zip(paths, expected):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    stamps = [p.stat().st_mtime_ns for p in paths]
    more = _task(cfg, prior_preservation=True, num_class_images=4, prior_loss_weight=0.5,
                 class_cache_dir=str(tmp_path), device="cpu").class_images(seed=0)
    assert more[:3] == paths and [p.stat().st_mtime_ns for p in paths] == stamps  # cached; only one new image

    rows = task.examples("train")
    assert len(rows) == 5 and {r["class_image"] for r in rows} == {str(p) for p in paths}  # dog: 5 photos, 3 classes
    batch = task.collate_fn(base.tokenizer)(rows[:2])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["is_prior"].tolist() == [False, False, True, True]
    inst, cls = base.tokenize([task.instance_prompt]), base.tokenize([task.class_prompt])
    assert torch.equal(batch["input_ids"], torch.cat([inst, inst, cls, cls]))

    model = copy.deepcopy(base)
    torch.manual_seed(1)
    out = model(**batch)
    assert out.instance_loss.item() == pytest.approx(out.per_example[:2].mean().item())
    assert out.prior_loss.item() == pytest.approx(out.per_example[2:].mean().item())
    assert out.loss.item() == pytest.approx(out.instance_loss.item() + 0.5 * out.prior_loss.item())
    torch.manual_seed(1)
    plain = model(**{**batch, "prior_loss_weight": torch.tensor(0.0)})  # same noise, no prior term
    assert plain.loss.item() == pytest.approx(out.instance_loss.item())
    assert out.prior_loss.item() > 0 and plain.prior_loss.item() == pytest.approx(out.prior_loss.item())


def test_prior_preservation_without_a_cache_names_the_keys(cfg):
    task = _task(cfg, prior_preservation=True, num_class_images=2)
    with pytest.raises(ValueError, match="class_images_dir"):
        task.examples("train")


# ---------------------------------------------------------------------------------------------- metrics


def test_metric_code_scores_identical_images_one():
    scorer = ImageScorer.random(image_size=32)
    photos = DreamBoothTask(subject="dog").references()
    metrics, per_image = scorer.score(photos[:2], ["a dog", "a dog in the snow"], photos[:1])
    assert per_image["dino"][0] == pytest.approx(1.0, abs=1e-5)  # the same image: cosine 1
    assert per_image["clip_i"][0] == pytest.approx(1.0, abs=1e-5)
    assert per_image["dino"][1] < 1 - 1e-4 and per_image["clip_i"][1] < 1 - 1e-4  # another photo: less
    assert metrics["dino"] == pytest.approx(np.mean(per_image["dino"]))
    assert all(-1 <= v <= 1 for v in per_image["clip_t"])
    assert not scorer.meaningful


def test_unreachable_models_fail_with_the_fix(cfg, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = _task(cfg, metrics_models="hub", dino_model="facebook/dino-vits16-not-cached")
    with pytest.raises(ModelUnavailableError, match="metrics_models=random"):
        task.examples("eval")  # before training, not after
    sd15 = compose_cfg(["task=dreambooth"]).model
    with pytest.raises(ModelUnavailableError, match="model=tiny_sd"):
        load_diffusion_model(sd15, DreamBoothTask.head)


# ---------------------------------------------------------------------------------------------- end to end


def test_python_m_bench_writes_images_and_a_record(tmp_path):
    cmd = [sys.executable, "-m", "bench", "+task=dreambooth", "model=tiny_sd", "+experiment=smoke", "method=lora",
           f"results_dir={tmp_path}", "progress=false", "task.max_eval_samples=6"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed" and record["main_metric"] == "dino" and record["model"] == "tiny_sd"
    assert set(record["metrics"]) == {"dino", "clip_i", "clip_t"} and "not meaningful" in record["eval_note"]
    assert record["curve"][-1]["step"] == 6 and (run_dir / "adapter.safetensors").exists()
    index = json.loads((run_dir / "images.json").read_text())
    assert len(index["images"]) == 6 and index["scores_meaningful"] is False
    for entry in index["images"]:
        with Image.open(run_dir / entry["file"]) as im:
            assert im.size == (32, 32)
    assert record["metrics"]["dino"] == pytest.approx(np.mean([e["dino"] for e in index["images"]]))
