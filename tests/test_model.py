"""The generator, the cross-modal attention, the discriminators, the losses and the inference object."""

from __future__ import annotations

import pytest
import torch

from prouigan import (
    PRESETS,
    Hallucinator,
    LossWeights,
    ProUIGANGenerator,
    build_discriminators,
    count_parameters,
    discriminator_loss,
    generator_config,
    generator_loss,
    save_generator,
)
from prouigan.attention import CrossModalAttention
from prouigan.discriminators import crop, local_crop_boxes
from prouigan.inference import generator_state
from prouigan.landmarks import heatmaps
from prouigan.losses import VGGFeatures, perceptual_network
from prouigan.training import channels_last_batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ProUIGANGenerator(PRESETS["tiny"])


def test_every_stage_has_the_right_shapes(tiny):
    out = tiny(torch.rand(2, 3, 16, 16))
    assert [tuple(i.shape) for i in out.images] == [(2, 3, 32, 32), (2, 3, 64, 64), (2, 3, 128, 128)]
    assert [tuple(h.shape) for h in out.heatmaps] == [(2, 68, 16, 16), (2, 68, 32, 32), (2, 68, 64, 64)]
    assert all(torch.isfinite(t).all() for t in out.images + out.heatmaps)


def test_outputs_stay_near_the_image_range_at_init(tiny):
    """Each stage adds a residual to the upsampled face, so an untrained net stays near the input's range."""
    lr = torch.rand(2, 3, 16, 16)
    out = tiny(lr)
    for img in out.images:
        assert img.min() > -0.5 and img.max() < 1.5
        assert (img.mean() - lr.mean()).abs() < 0.2


def test_presets_have_the_documented_sizes():
    sizes = {name: count_parameters(ProUIGANGenerator(cfg)) for name, cfg in PRESETS.items()}
    assert sizes["tiny"] < 100_000
    assert 1_000_000 < sizes["cpu-small"] < 2_000_000
    assert sizes["gpu-paper"] > 10_000_000


def test_gradients_reach_every_parameter_of_g_and_both_ds(tiny):
    d_g, d_l = build_discriminators("tiny")
    hr = torch.rand(2, 3, 128, 128)
    lm = torch.rand(2, 68, 2) * 100 + 14
    targets = [heatmaps(lm, r, 1.5) for r in (16, 32, 64)]
    out = tiny(torch.rand(2, 3, 16, 16))
    boxes = local_crop_boxes(lm, 2)
    total, terms = generator_loss(out, hr, targets, LossWeights(adversarial=1.0), d_g, d_l, boxes)
    assert set(terms) == {"pixel", "heatmap", "tv", "adversarial"}
    tiny.zero_grad()
    total.backward()
    missing = [n for n, p in tiny.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    d_g.zero_grad()
    d_l.zero_grad()
    d_total, d_terms = discriminator_loss(d_g, d_l, hr, out.final, boxes)
    d_total.backward()
    for d in (d_g, d_l):
        missing = [n for n, p in d.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert missing == []
    assert set(d_terms) == {"d_global", "d_local"}


def test_cross_modal_attention_uses_the_landmark_branch():
    torch.manual_seed(0)
    att = CrossModalAttention(face_channels=8, prior_channels=6, dim=4, max_tokens=64)
    face, prior = torch.randn(2, 8, 16, 16), torch.randn(2, 6, 16, 16)
    f1, p1 = att(face, prior)
    f2, _ = att(face, torch.randn(2, 6, 16, 16))
    assert not torch.allclose(f1, f2, atol=1e-4)  # other landmark features -> other face features
    # keys really steer the map: changing only the key projection changes the face update
    with torch.no_grad():
        att.k.weight.add_(torch.randn_like(att.k.weight))
    f3, _ = att(face, prior)
    assert not torch.allclose(f1, f3, atol=1e-4)
    # and the transposed map enhances the landmark features from the face side
    _, p2 = att(torch.randn(2, 8, 16, 16), prior)
    assert not torch.allclose(p1, p2, atol=1e-4)


def test_attention_matches_an_explicit_softmax_map():
    """SDPA in both directions == the written-out map S = QK^T/sqrt(d), softmax one way and the other."""
    torch.manual_seed(1)
    att = CrossModalAttention(6, 5, dim=4, max_tokens=10_000, gamma_init=1.0)
    face, prior = torch.randn(1, 6, 4, 4), torch.randn(1, 5, 4, 4)
    f, p = att(face, prior)
    q = att.q(face).flatten(2)[0].T  # (N, d)
    k = att.k(prior).flatten(2)[0].T  # (M, d)
    s = q @ k.T / 2.0  # sqrt(4)
    vf = att.v_face(face).flatten(2)[0].T
    vp = att.v_prior(prior).flatten(2)[0].T
    f_ref = face + (torch.softmax(s, 1) @ vp).T.reshape(1, 6, 4, 4)
    p_ref = prior + (torch.softmax(s.T, 1) @ vf).T.reshape(1, 5, 4, 4)
    assert torch.allclose(f, f_ref, atol=1e-5) and torch.allclose(p, p_ref, atol=1e-5)


def test_keys_are_pooled_at_large_resolutions():
    att = CrossModalAttention(4, 4, dim=4, max_tokens=1024)
    assert att.key_grid(64, 64) == (32, 32) and att.key_grid(32, 32) == (32, 32)
    f, p = att(torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64))
    assert f.shape == p.shape == (1, 4, 64, 64)


def test_local_crops_sit_on_eyes_or_mouth():
    lm = torch.zeros(1, 68, 2)
    lm[:, 36:42] = torch.tensor([30.0, 50.0])
    lm[:, 42:48] = torch.tensor([90.0, 50.0])
    lm[:, 48:68] = torch.tensor([60.0, 100.0])
    corners = {tuple(local_crop_boxes(lm, 1, generator=torch.Generator().manual_seed(s))[0].tolist())
               for s in range(30)}
    assert corners == {(0, 18), (58, 18), (28, 64)}  # clamped inside the image
    assert crop(torch.rand(1, 3, 128, 128), torch.tensor([[28, 64]])).shape == (1, 3, 64, 64)


def test_perceptual_loss_needs_a_local_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        VGGFeatures(tmp_path / "vgg19.pth")
    vgg, msg = perceptual_network(LossWeights(perceptual=0.1), None)
    assert vgg is None and "OFF" in msg and "nothing is downloaded" in msg
    assert perceptual_network(LossWeights(), None)[0] is None
    with pytest.raises(FileNotFoundError):
        perceptual_network(LossWeights(style=1.0), tmp_path / "missing.pth")


def test_vgg_loader_takes_a_torchvision_style_state_dict(tmp_path):
    # weights in torchvision's key layout (values random: this tests the loader, not VGG)
    layers = []
    ch = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]:
        if v == "M":
            layers.append(None)
        else:
            layers += [torch.nn.Conv2d(ch, v, 3, padding=1), None]
            ch = v
    state = {}
    for i, layer in enumerate(layers):
        if layer is not None:
            state[f"features.{i}.weight"] = layer.weight.detach()
            state[f"features.{i}.bias"] = layer.bias.detach()
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg19.pth")
    vgg = VGGFeatures(tmp_path / "vgg19.pth")
    taps = vgg(torch.rand(1, 3, 64, 64))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512]
    out = ProUIGANGenerator(PRESETS["tiny"])(torch.rand(1, 3, 16, 16))
    _, terms = generator_loss(out, torch.rand(1, 3, 128, 128), [torch.zeros(1, 68, r, r) for r in (16, 32, 64)],
                              LossWeights(perceptual=1.0, style=1.0), vgg=vgg)
    assert terms["perceptual"] > 0 and terms["style"] > 0


def test_hallucinator_round_trips_a_checkpoint(tmp_path, tiny):
    save_generator(tiny, tmp_path / "g.pt")
    h = Hallucinator.load(tmp_path / "g.pt")
    lr = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        ref = tiny.eval()(lr).final.clamp(0, 1)
    assert torch.allclose(h(lr, batch_size=2), ref, atol=1e-6)
    u8 = (lr.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    out = h.to_uint8(u8)
    assert out.shape == (5, 128, 128, 3) and out.dtype.name == "uint8"
    run = h.run(lr)
    assert len(run.images) == 3 and run.heatmaps[-1].shape == (5, 68, 64, 64)
    with pytest.raises(ValueError, match="16x16"):
        h(torch.rand(1, 3, 32, 32))


def test_hallucinator_rejects_other_files(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a Pro-UIGAN generator checkpoint"):
        Hallucinator.load(tmp_path / "x.pt")


def test_a_crafted_checkpoint_is_refused_before_its_generator_is_built(tmp_path, tiny):
    """Every field within its own bound, their product ~15 G parameters: refused from a generator built on the meta
    device (no memory), as is a checkpoint whose tensors are not the shapes its config makes."""
    state = generator_state(tiny)
    state["generator_config"] = {**state["generator_config"], "channels": [2048, 2048, 2048], "blocks": [64, 64, 64]}
    torch.save(state, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match=r"asks for [\d,]+ M parameters \(the limit is 200 M\)"):
        Hallucinator.load(tmp_path / "huge.pt")
    state = generator_state(tiny)
    key = next(iter(state["generator"]))
    state["generator"][key] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "bent.pt")
    with pytest.raises(ValueError, match=f"weight {key} is \\(2, 2\\)"):
        Hallucinator.load(tmp_path / "bent.pt")


def test_a_served_request_is_capped_before_anything_is_decoded():
    from mlflow.exceptions import MlflowException

    from prouigan_platform.serving import MAX_FACES, as_faces

    with pytest.raises(MlflowException, match=f"{MAX_FACES + 1} faces in one request; the limit is {MAX_FACES}"):
        as_faces(["not even an image"] * (MAX_FACES + 1))


def test_external_frozen_prior_replaces_the_learned_one():
    class Prior(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 68, 1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    cfg = generator_config("tiny")
    g_ext = ProUIGANGenerator(cfg, external_prior=Prior())
    assert not any(p.requires_grad for p in g_ext.external_prior.parameters())
    g_plain = ProUIGANGenerator(cfg)
    g_plain.load_state_dict({k: v for k, v in g_ext.state_dict().items() if not k.startswith("external_prior")})
    lr = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(g_ext(lr).final, g_plain(lr).final)


def test_plain_cnn_baseline_has_no_priors_no_attention_and_about_cpu_smalls_size(tmp_path):
    plain = ProUIGANGenerator(generator_config("cpu-small-plain"))
    names = [n for n, _ in plain.named_modules()]
    assert not any(k in n for n in names for k in ("attention", "prior", "heatmap", "fuse"))
    n_plain, n_pro = count_parameters(plain), count_parameters(ProUIGANGenerator(generator_config("cpu-small")))
    assert abs(n_plain - n_pro) / n_pro < 0.15
    out = plain(torch.rand(2, 3, 16, 16))
    assert out.heatmaps == [] and tuple(out.final.shape) == (2, 3, 128, 128)
    total, terms = generator_loss(out, torch.rand(2, 3, 128, 128), [], LossWeights(pixel=0, pixel_l1=1, heatmap=0,
                                                                                   adversarial=0, tv=0))
    assert "heatmap" not in terms and torch.isclose(total, terms["pixel_l1"])
    total.backward()
    assert all(p.grad is not None for p in plain.parameters())
    save_generator(plain, tmp_path / "plain.pt")
    h = Hallucinator.load(tmp_path / "plain.pt")
    assert h.run(torch.rand(3, 3, 16, 16)).heatmaps == []


@pytest.mark.parametrize("prior_max_size,fuse_kernel", [(16, 1), (32, 3)])
def test_priors_on_pooled_features_keep_every_stages_shapes_and_gradients(prior_max_size, fuse_kernel):
    torch.manual_seed(0)
    g = ProUIGANGenerator(generator_config("tiny", {"prior_max_size": prior_max_size, "fuse_kernel": fuse_kernel}))
    out = g(torch.rand(2, 3, 16, 16))
    assert [tuple(h.shape) for h in out.heatmaps] == [(2, 68, 16, 16), (2, 68, 32, 32), (2, 68, 64, 64)]
    lm = torch.rand(2, 68, 2) * 100 + 14
    total, _ = generator_loss(out, torch.rand(2, 3, 128, 128), [heatmaps(lm, r, 1.5) for r in (16, 32, 64)],
                              LossWeights(adversarial=0))
    total.backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_crop_gathers_the_same_pixels_as_slicing_and_stays_differentiable():
    imgs = torch.rand(5, 3, 128, 128, requires_grad=True)
    boxes = torch.tensor([[0, 0], [64, 64], [10, 50], [63, 1], [32, 17]])
    out = crop(imgs, boxes)
    ref = torch.stack([im[:, y:y + 64, x:x + 64] for im, (x, y) in zip(imgs, boxes.tolist(), strict=True)])
    assert out.shape == (5, 3, 64, 64) and torch.equal(out, ref)
    out.sum().backward()
    assert imgs.grad.sum().item() == 5 * 3 * 64 * 64  # each cropped pixel once


def test_a_face_without_landmarks_gets_a_random_box_the_others_keep_theirs():
    from prouigan.training import crop_boxes

    lm = torch.full((4, 68, 2), 64.0)  # every point at the centre: the eye/mouth box is centred at (32, 32)
    has = torch.tensor([True, False, True, False])
    torch.manual_seed(0)
    boxes = [crop_boxes({"landmarks": lm, "has_landmarks": has}) for _ in range(20)]
    assert all(b[0].tolist() == [32, 32] and b[2].tolist() == [32, 32] for b in boxes)
    assert len({tuple(b[1].tolist()) for b in boxes}) > 1 and all(((b >= 0) & (b <= 64)).all() for b in boxes)


def test_a_training_step_returns_tensors_and_uses_multi_tensor_adam():
    from prouigan.training import GANStep

    torch.manual_seed(0)
    g = ProUIGANGenerator(PRESETS["tiny"])
    step = GANStep(g, *build_discriminators("tiny"), LossWeights(adversarial=1e-3))
    assert step.opt_g.defaults["foreach"] and step.opt_d.defaults["foreach"]  # fused is for CUDA parameters
    lm = torch.rand(2, 68, 2) * 60 + 34
    logs = step.step({"lr": torch.rand(2, 3, 16, 16), "hr": torch.rand(2, 3, 128, 128), "landmarks": lm,
                      "has_landmarks": torch.tensor([True, False])})
    assert {"g_total", "d_global", "d_local", "g_grad_norm", "pixel"} <= set(logs)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert all(torch.isfinite(v) for v in logs.values())


def _tiny_step(**kw):
    from prouigan.training import GANStep

    torch.manual_seed(0)
    return GANStep(ProUIGANGenerator(PRESETS["tiny"]), *build_discriminators("tiny"), LossWeights(adversarial=1e-3),
                   **kw)


def _batch(n=2, nhwc=False):
    g = torch.Generator().manual_seed(1)
    b = {"lr": torch.rand(n, 3, 16, 16, generator=g), "hr": torch.rand(n, 3, 128, 128, generator=g),
         "landmarks": torch.rand(n, 68, 2, generator=g) * 60 + 34, "has_landmarks": torch.tensor([True, False])}
    return channels_last_batch(b) if nhwc else b


def test_a_compile_failure_warns_once_and_the_step_runs_eager_with_the_same_losses():
    """torch.compile fails on the first call where the machine cannot compile: the step must go on, eager."""
    torch._dynamo.reset()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    eager = _tiny_step().step(_batch())
    step = _tiny_step(compile_mode="default", compile_backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile of the generator failed, running it eager"):
        logs = step.step(_batch())
    fw = step.forwards["generator"]
    assert fw.running == "eager" and "no C++ compiler" in fw.fallback_reason
    assert all(torch.allclose(logs[k], eager[k]) for k in eager)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: later steps go straight to eager
        step.step(_batch())


def test_an_error_after_the_compiled_path_ran_is_raised_not_hidden():
    from prouigan.training import Compiled

    calls = {"n": 0}

    def fn(x):
        calls["n"] += 1
        return x * 2

    c = Compiled(fn, "default", "fn", backend="eager")
    assert torch.equal(c(torch.ones(3)), torch.full((3,), 2.0)) and c.running == "compiled"
    with pytest.raises(TypeError, match="positional argument"):
        c(torch.ones(3), torch.ones(2))  # a real error (wrong arguments) after success: raised


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])  # inductor: ~2 min
def test_a_compiled_step_gives_the_eager_steps_losses(backend):
    """Dynamo traces G and both Ds (``eager``: the graphs as captured; ``inductor``: real generated C++ code on
    CPU) and the step's losses match the eager step's."""
    torch._dynamo.reset()
    eager = _tiny_step()
    compiled = _tiny_step(compile_mode="default", compile_backend=backend)
    for i in range(2):  # the second step runs after an optimizer update: the compiled graphs see new weights
        torch.manual_seed(10 + i)  # the same random crop box for the face without landmarks
        want = eager.step(_batch())
        torch.manual_seed(10 + i)
        got = compiled.step(_batch())
    assert compiled.forwards["generator"].running == "compiled", compiled.forwards["generator"].fallback_reason
    assert all(f.running == "compiled" for f in compiled.forwards.values())
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-4), (k, got[k], want[k])


def test_channels_last_changes_the_layout_not_the_result():
    from prouigan.training import channels_last

    eager = _tiny_step()
    nhwc = _tiny_step()
    channels_last(nhwc.g, nhwc.d_global, nhwc.d_local)
    conv = next(m for m in nhwc.g.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    torch.manual_seed(10)
    want = eager.step(_batch())
    torch.manual_seed(10)
    got = nhwc.step(_batch(nhwc=True))
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5), (k, got[k], want[k])


def test_one_learning_rate_cycle_warms_up_then_follows_the_cosine():
    from prouigan.training import cosine_factor, warmup_cosine_factor

    assert warmup_cosine_factor(0.0, 0.05) == pytest.approx(0.02)
    assert warmup_cosine_factor(0.025, 0.05) == pytest.approx(0.51)  # half way up
    assert warmup_cosine_factor(0.05, 0.05) == pytest.approx(1.0)
    assert warmup_cosine_factor(0.525, 0.05) == pytest.approx(cosine_factor(0.5))  # the cosine, over the rest
    assert warmup_cosine_factor(1.0, 0.05) == pytest.approx(0.02) == warmup_cosine_factor(7.0, 0.05)
