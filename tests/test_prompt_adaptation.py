"""Prompt-based adaptation (the paper's Table 4): the CLIP tower frozen, STCA kept, prompt generators between blocks.

The block with prompts is the plain block on ``[prompts; tokens]`` without the prompt rows (float64, forward and
backward, both projections); shared and per-path projections agree with prompts; in the encoder only the
generators receive gradients and change, and no prompt reaches the pooling; checkpoints hold only what trains
and the frozen tower's digest, and round-trip through evaluation, resume and a refused other tower; the config
refuses what cannot go with it; every ``table4_*`` preset is its row and builds and runs."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("omegaconf")

from open_clip.transformer import ResidualAttentionBlock

import stdd_kernels
from stdd.engine.config import PRESET_DIR, VALUE_CHOICES, ConfigError, load_config, prompt_settings_of
from stdd.model import ADAPTATIONS, PromptGenerator, PromptSettings, STCABlock, STCASettings, VideoEncoder, load_clip
from stdd.model.stca_settings import PROJECTIONS

TINY_MODEL = "STDD-Tiny-ViT-8x8"  # 8x8 patch grid, width 64, 2 blocks


def _block(width=48, heads=4, seed=0):
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads)
    with torch.no_grad():  # non-trivial biases and layer norms
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return block.double()


def _grads(module, *tensors):
    return [t.grad.clone() for t in tensors] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_block_with_prompts_is_the_plain_block_on_prompts_and_tokens(projection):
    """Masking and mixing off: the STCA block with prompts computes open_clip's block on [prompts; tokens] and
    returns the token rows, forward and backward (float64)."""
    batch, frames, grid, width, count = 2, 3, 4, 48, 5
    block = _block(width)
    settings = STCASettings(mask_ratio=0.0, mixing="none", projection=projection, backend="reference")
    stca = STCABlock(block, settings, num_frames=frames)
    torch.manual_seed(1)
    x = torch.randn(batch * frames, 1 + grid * grid, width, dtype=torch.float64, requires_grad=True)
    prompts = torch.randn(batch * frames, count, width, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(batch * frames, 1 + grid * grid, width, dtype=torch.float64)
    out = stca(x, prompts=prompts)
    (out * upstream).sum().backward()
    got = [out.detach()] + _grads(block, x, prompts)
    for tensor in (x, prompts, *block.parameters()):
        tensor.grad = None
    expected = block(torch.cat([prompts, x], dim=1))[:, count:]
    (expected * upstream).sum().backward()
    want = [expected.detach()] + _grads(block, x, prompts)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert out.shape == x.shape  # the prompt rows are dropped


@pytest.mark.parametrize("mixing", ["continual", "separate"])
def test_shared_and_per_path_projections_agree_with_prompts(mixing):
    """With masking and mixing on, the shared projections (docs/stca.md section 6) equal the written-out
    computation with prompts in every path, forward and backward, on an odd shape (float64)."""
    batch, frames, grid, width, count = 2, 3, 6, 48, 3
    results = []
    torch.manual_seed(3)
    x0 = torch.randn(batch * frames, 1 + grid * grid, width, dtype=torch.float64)
    p0 = torch.randn(batch * frames, count, width, dtype=torch.float64)
    upstream = torch.randn_like(x0)
    phase = stdd_kernels.mask_phase(batch, frames, mode="train", generator=torch.Generator().manual_seed(2))
    for projection in PROJECTIONS:
        block = _block(width)
        settings = STCASettings(mask_ratio=0.5, mixing=mixing, scales=(1, 2), channel_fold=8, projection=projection,
                                backend="reference")
        stca = STCABlock(block, settings, num_frames=frames)
        x, prompts = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        out = stca(x, phase, prompts=prompts)
        (out * upstream).sum().backward()
        results.append([out.detach()] + _grads(block, x, prompts))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


def test_prompts_of_the_wrong_shape_name_the_argument():
    stca = STCABlock(_block(48), STCASettings(backend="reference", channel_fold=8), num_frames=2)
    x = torch.randn(4, 17, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"prompts must have shape \(B\*T, P, D\) = \(4, P, 48\)"):
        stca(x, prompts=torch.randn(4, 3, 32, dtype=torch.float64))


def _encoder(prompts=PromptSettings(tokens=3, hidden=16), seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, _ = load_clip(TINY_MODEL, None, allow_random_init=True)
        encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=4), prompts=prompts)
    return encoder


def test_only_the_generators_train_and_no_prompt_reaches_the_pooling():
    encoder = _encoder()
    assert len(encoder.prompt_generators) == len(encoder.blocks) - 1
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("prompt_generators.") for name in trainable)
    frozen_before = {name: p.detach().clone() for name, p in encoder.visual.named_parameters()}
    generators_before = {name: p.detach().clone() for name, p in encoder.prompt_generators.named_parameters()}
    pooled_shapes, block_shapes = [], []
    pool = encoder.visual._pool

    def recording_pool(tokens):
        pooled_shapes.append(tuple(tokens.shape))
        return pool(tokens)

    encoder.visual._pool = recording_pool
    hooks = [block.register_forward_hook(lambda m, i, o: block_shapes.append(tuple(o.shape))) for block in encoder.blocks]
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    encoder.train()
    video = torch.randn(2, 4, 3, 32, 32)
    out = encoder(video)
    out.square().mean().backward()
    optimizer.step()
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 4, encoder.output_dim)
    tokens = 1 + 8 * 8
    assert pooled_shapes == [(8, tokens, 64)] and block_shapes == [(8, tokens, 64)] * len(encoder.blocks)
    for name, p in encoder.visual.named_parameters():
        assert p.grad is None and torch.equal(p, frozen_before[name]), name
    changed = [name for name, p in encoder.prompt_generators.named_parameters()
               if not torch.equal(p, generators_before[name])]
    assert sorted(changed) == sorted(generators_before)


def test_the_generators_reach_the_output_and_the_digest_names_the_tower():
    encoder = _encoder()
    video = torch.randn(1, 2, 3, 32, 32)
    before = encoder(video)
    with torch.no_grad():
        encoder.prompt_generators[0].fc2.weight.normal_()
    assert not torch.allclose(encoder(video), before)  # prompts change what the next block computes
    assert torch.equal(encoder.frozen_digest, _encoder(seed=0).frozen_digest)
    assert not torch.equal(encoder.frozen_digest, _encoder(seed=1).frozen_digest)


def test_prompt_settings_and_encoder_refuse_bad_values():
    with pytest.raises(ValueError, match="prompt tokens must be an int >= 1"):
        PromptSettings(tokens=0)
    with pytest.raises(ValueError, match="prompt hidden must be an int >= 1 or None"):
        PromptSettings(hidden=True)
    assert PromptSettings().hidden_width(768) == 192
    clip, _ = load_clip(TINY_MODEL, None, allow_random_init=True)
    with pytest.raises(ValueError, match="needs temporal='stca'"):
        VideoEncoder(clip.visual, None, prompts=PromptSettings())
    generator = PromptGenerator(64, 65, PromptSettings(tokens=2))
    with pytest.raises(ValueError, match=r"tokens must have shape \(R, 65, 64\)"):
        generator(torch.randn(2, 17, 64))


# ----------------------------------------------------------------------------- config


def test_the_config_refuses_what_prompt_adaptation_cannot_go_with():
    assert VALUE_CHOICES["model.adaptation"] is ADAPTATIONS
    assert prompt_settings_of(load_config("demo")) is None
    cfg = load_config("demo", ["model.adaptation=prompt", "model.prompt.tokens=4"])
    assert prompt_settings_of(cfg) == PromptSettings(tokens=4, hidden=None)
    cases = [
        (["model.adaptation=prompts"], r"model.adaptation='prompts': expected one of full, prompt"),
        (["model.adaptation=prompt", "model.temporal=none"], r"model.adaptation=prompt: .* needs model.temporal=stca"),
        (["model.adaptation=prompt", "model.stca.enabled=false"], r"needs model.temporal=stca"),
        (["model.adaptation=prompt", "model.weight_interpolation=0.5"], r"^model.weight_interpolation=0.5: "),
        (["model.adaptation=prompt", "averaging.include_raw_clip=true"], r"^averaging.include_raw_clip=true: "),
        (["model.prompt.tokens=0"], r"model.prompt.tokens=0: expected an integer >= 1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config("demo", overrides)


# ----------------------------------------------------------------------------- runs and checkpoints

TINY_RUN = ["data.num_workers=0", "run.tensorboard=false", "data.synthetic.videos_per_class=2",
            "data.synthetic.val_videos_per_class=1", "data.synthetic.classes=[moving left,moving right]",
            "data.batch_size=2", "data.frame_cache_mb=0", "optim.warmup_epochs=0", "eval.batch_size=2",
            "checkpoint.every_steps=0", "checkpoint.every_epochs=1"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """Two CLIP weights files of the tiny model (random weights of seeds 0 and 1)."""
    folder = tmp_path_factory.mktemp("clip")
    files = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip, _ = load_clip(TINY_MODEL, None, allow_random_init=True)
        files.append(folder / f"clip_seed{seed}.pt")
        torch.save(clip.state_dict(), files[-1])
    return files


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    pytest.importorskip("av")
    return tmp_path_factory.mktemp("videos")


def _prompt_run(run_dir: Path, data_root: Path, clip_file: Path, *extra) -> "object":
    return load_config("demo", [*TINY_RUN, f"data.root={data_root}", f"run.output_dir={run_dir}",
                                f"model.pretrained={clip_file}", "model.adaptation=prompt", "model.prompt.tokens=2",
                                "model.prompt.hidden=8", *extra])


def test_a_prompt_run_stores_only_what_trains_and_evaluates_resumes_and_refuses_another_tower(
        tmp_path, data_root, clip_files):
    from stdd.engine.checkpoint import load_weights
    from stdd.engine.inference import config_for_weights, load_model_for_inference
    from stdd.engine.task import FROZEN_DIGEST_KEY, build_model, load_student_state_dict
    from stdd.engine.trainer import run_training

    straight = run_training(_prompt_run(tmp_path / "straight", data_root, clip_files[0], "optim.epochs=2"), quiet=True)
    weights = load_weights(straight["final_weights"])
    keys = set(weights["model"])
    assert keys and all(k.startswith("video_encoder.prompt_generators.") for k in keys - {FROZEN_DIGEST_KEY})
    assert FROZEN_DIGEST_KEY in keys and not any(k.startswith("video_encoder.visual.") for k in keys)
    assert "logit_scale" not in keys

    # Evaluation: the stored config names the CLIP file (followed when trusted), the generators go onto it.
    cfg, state = config_for_weights(straight["final_weights"], None, [], trust_checkpoint_pretrained=True)
    model, _, report = load_model_for_inference(cfg, state, "cpu")
    assert report.format == "stdd"
    trained = {k: v for k, v in model.state_dict().items() if k in keys}
    assert all(torch.equal(trained[k], weights["model"][k]) for k in keys)
    video = torch.randn(1, int(cfg.data.num_frames), 3, 32, 32)
    reference_model, _ = build_model(cfg, "cpu", with_teacher=False)
    assert not torch.allclose(reference_model.video_encoder(video), model.video_encoder(video))  # trained != init

    # A run stopped after one epoch and resumed ends with the same generators as the straight one.
    stopped = tmp_path / "resumed"
    run_training(_prompt_run(stopped, data_root, clip_files[0], "optim.epochs=2", "run.max_steps=1"), quiet=True)
    resumed = run_training(_prompt_run(stopped, data_root, clip_files[0], "optim.epochs=2"), resume="auto", quiet=True)
    again = load_weights(resumed["final_weights"])["model"]
    assert set(again) == keys and all(torch.equal(again[k], weights["model"][k]) for k in keys)

    # On another frozen tower the generators are refused, naming why.
    other, _ = build_model(_prompt_run(tmp_path / "other", data_root, clip_files[1]), "cpu", with_teacher=False)
    with pytest.raises(ValueError, match="trained on another frozen CLIP tower"):
        load_student_state_dict(other, weights["model"], source="final.pt")
    # Without a checkpoint the generators would be untrained: refused.
    with pytest.raises(ConfigError, match="model.adaptation=prompt: --checkpoint gives no checkpoint"):
        load_model_for_inference(cfg, None, "cpu")
    # A full-adaptation checkpoint does not fit a prompt model (and the message says which key to look at).
    full = run_training(load_config("demo", [*TINY_RUN, f"data.root={data_root}", "optim.epochs=1",
                                             f"run.output_dir={tmp_path / 'full'}", f"model.pretrained={clip_files[0]}"]),
                        quiet=True)
    with pytest.raises(ValueError, match="model.adaptation"):
        load_student_state_dict(other, load_weights(full["final_weights"])["model"], source="final.pt")


def test_the_ema_weights_of_a_prompt_run_hold_only_what_trains(tmp_path, data_root, clip_files):
    from stdd.engine.checkpoint import load_weights
    from stdd.engine.trainer import run_training

    result = run_training(_prompt_run(tmp_path / "ema", data_root, clip_files[0], "optim.epochs=1",
                                      "averaging.ema_decay=0.9", "averaging.epochs=all"), quiet=True)
    final = set(load_weights(result["final_weights"])["model"])
    assert set(load_weights(result["ema_weights"])["model"]) == final
    assert set(load_weights(result["averaged_weights"])["model"]) == final


# ----------------------------------------------------------------------------- the Table 4 presets

TABLE4 = sorted(p.stem for p in PRESET_DIR.glob("table4_*.yaml"))


def _row(preset: str) -> dict:
    """What a preset named table4_<frozen | prompt|full>[_wsm]_mcm_<mixing> must set."""
    if preset == "table4_frozen":
        return {"model.temporal": "none", "model.adaptation": "full"}
    _, adaptation, *rest = preset.split("_")
    wsm = rest[0] == "wsm"
    return {"model.temporal": "stca", "model.adaptation": adaptation, "model.stca.mask_ratio": 0.5 if wsm else 0.0,
            "model.stca.mixing": rest[-1]}


def test_table4_has_its_nine_rows():
    assert len(TABLE4) == 9 and "table4_frozen" in TABLE4
    assert {(_row(p)["model.adaptation"], _row(p).get("model.stca.mask_ratio"), _row(p).get("model.stca.mixing"))
            for p in TABLE4 if p != "table4_frozen"} == {
        (a, m, x) for a in ADAPTATIONS for m in (0.0, 0.5) for x in ("separate", "continual")}


@pytest.mark.parametrize("preset", TABLE4)
def test_every_table4_preset_is_its_row_and_runs(preset, tmp_path, data_root, clip_files):
    from omegaconf import OmegaConf

    from stdd.engine.trainer import Trainer, run_training

    base = load_config("k400_vitb16")
    cfg = load_config(preset)
    for key, value in _row(preset).items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.model.clip_name == base.model.clip_name and cfg.model.pretrained == base.model.pretrained
    assert cfg.run.output_dir == f"runs/{preset}"
    # The preset's own keys on the tiny model and data: one training step (the frozen row: scored untrained).
    own = [f"{key}={OmegaConf.select(cfg, key)}" for key in _row(preset)]
    if cfg.model.adaptation == "prompt":
        own += [f"averaging.include_raw_clip={cfg.averaging.include_raw_clip}"]
    tiny = load_config("demo", [*TINY_RUN, f"data.root={data_root}", f"run.output_dir={tmp_path / 'run'}",
                                f"model.pretrained={clip_files[0]}", "optim.epochs=1", "run.max_steps=1", *own])
    if preset == "table4_frozen":
        trainer = Trainer(tiny, quiet=True)
        try:
            assert trainer.evaluate()["val_videos"] == 2
        finally:
            trainer.close()
    else:
        result = run_training(tiny, quiet=True)
        assert result["global_step"] == 1
        stored = json.dumps(OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "config.yaml")))
        assert f'"adaptation": "{cfg.model.adaptation}"' in stored


def test_the_release_settings_train_and_predict_with_prompt_adaptation(tmp_path, data_root, clip_files):
    """The authors' release's STCA (k400_vitb16_official: official mixing, per-block shuffled phases, shuffled
    evaluation phases) with prompt-based adaptation: a run, then a prediction from its checkpoint."""
    from omegaconf import OmegaConf

    from stdd.engine.trainer import run_training
    from stdd.predict import predict

    official = load_config("k400_vitb16_official")
    release = [f"model.stca.{key}={value}" for key, value in OmegaConf.to_container(official.model.stca).items()
               if key in ("mixing", "mask_rounding", "shuffle_phases", "per_block_phases", "eval_shuffle_phases")]
    cfg = _prompt_run(tmp_path / "run", data_root, clip_files[0], "optim.epochs=1", *release)
    assert cfg.model.stca.mixing == "official" and cfg.model.stca.per_block_phases
    result = run_training(cfg, quiet=True)
    video = sorted(Path(cfg.data.root).rglob("*.mp4"))[0]
    predictions = predict(video, ["moving left", "moving right"], checkpoint=result["final_weights"],
                          trust_checkpoint_pretrained=True, top_k=2, device="cpu")
    assert len(predictions) == 1 and len(predictions[0]["predictions"]) == 2


def test_gradient_checkpointing_gives_the_generators_the_same_gradients():
    video = torch.randn(2, 4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        encoder = _encoder().double().train()
        encoder.set_grad_checkpointing(checkpointing)
        encoder(video.double()).square().mean().backward()
        grads.append([p.grad for p in encoder.prompt_generators.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bench/ablations.py


def test_the_ablation_bench_runs_the_grid_and_writes_its_record(tmp_path):
    """bench/ablations.py on a tiny set, one seed, one epoch: the stand-in is exported as an open_clip file whose
    image tower is the frame-only run's, every Table 4 row runs from it with its preset's row keys, and the record
    holds every row, the summary table and the full-scale commands."""
    pytest.importorskip("av")
    import importlib.util

    from omegaconf import OmegaConf

    from stdd.engine.checkpoint import load_weights

    spec = importlib.util.spec_from_file_location("bench_ablations", PRESET_DIR.parents[1] / "bench" / "ablations.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert sorted(preset for _, preset in bench.ROWS) == TABLE4
    overrides = bench.row_overrides("table4_prompt_wsm_mcm_separate")
    cfg = load_config("demo", overrides)
    for key, value in _row("table4_prompt_wsm_mcm_separate").items():
        assert OmegaConf.select(cfg, key) == value

    out = tmp_path / "record.json"
    tiny = [o for o in TINY_RUN if not o.startswith("checkpoint.")] + ["optim.epochs=1"]
    assert bench.main(["--machine", "test", "--seeds", "0", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                       *tiny]) == 0
    record = json.loads(out.read_text())
    runs = record["runs"]["0"]
    assert set(runs) == {"clip_standin", *TABLE4}
    assert runs["table4_frozen"]["top1"] == runs["clip_standin"]["top1"]  # the stand-in, scored as it is
    assert set(record["summary"]) == set(TABLE4) and len(record["full_scale_commands"]) == len(TABLE4)
    assert all(runs[p]["overrides"][-1] == f"run.output_dir={tmp_path / 'work' / 'seed0' / p}" for p in TABLE4)
    # The exported file holds the frame-only run's image tower.
    standin = load_weights(tmp_path / "work" / "seed0" / "clip_standin" / "final.pt")["model"]
    clip, _ = load_clip(TINY_MODEL, str(tmp_path / "work" / "seed0" / "clip_standin.pt"))
    for name, value in clip.visual.state_dict().items():
        assert torch.equal(value, standin[f"video_encoder.visual.{name}"]), name
