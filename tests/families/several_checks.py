"""Checks of several images and of video in one prompt, shared by the family tests and scripts/coverage.py.

Each check takes a loaded `VLM` (and the checkpoint path for the independent references) and raises
AssertionError naming what differs. The references are independent of the engine: the model's own hidden states
of each image prepared alone (which image's features sit at ``image@n``), the model's own M-RoPE temporal positions
or its own embeddings of an edited frame (which tokens are ``frame@t``), stock eager attention with entries masked
by hand in float64 (`tests.engine.reference`, knockouts) and a plain forward pre-hook (patches).
"""

from __future__ import annotations

import torch

import narrowgate as ng
from narrowgate.engine.shared import Condition
from tests.engine import reference
from tests.fixtures.common import images

ATOL = 1e-5
PROMPTS = ["What color is the shape in the second image?", "Describe the first image."]
CLIP_PROMPT = "What happens in the video?"


def close(a, b, what: str, atol: float = ATOL) -> None:
    diff = (a.double() - b.double()).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"{what} differ by {diff:.2e}")


def two_images(seed: int = 0) -> list[list]:
    """Two examples of two different images each."""
    ims = images(4, seed=seed)
    return [[ims[0], ims[1]], [ims[2], ims[3]]]


def hidden(vlm, batch) -> tuple:
    with torch.no_grad():
        out = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False)
    return getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states  # BLIP-2 nests its LM's


def check_image_roles(vlm) -> None:
    """Each image's roles sit where that image's features are: the embeddings at ``image@n``'s content tokens are
    the model's embeddings of image n prepared alone (its first ones, where a prompt of several images gets fewer
    features per image: LLaVA-OneVision's base features); ``image``/``eoi`` are the union over the images, eoi@n
    follows image n, ``text`` follows the last image, and every position of the prompt is in at most one image."""
    examples = two_images()
    batch = vlm.prepare(examples, PROMPTS)
    hs0 = hidden(vlm, batch)[0]
    for b, ims in enumerate(examples):
        assert len(batch.visuals(b)) == 2
        spans = []
        for n, im in enumerate(ims, 1):
            content = batch.positions(f"image_content@{n}")[b]
            alone = vlm.prepare([im], [PROMPTS[b]])
            mine = alone.positions("image_content")[0]
            if len(content) > len(mine):
                raise AssertionError(f"image {n} has {len(content)} content tokens, {len(mine)} alone")
            close(hs0[b, content], hidden(vlm, alone)[0][0, mine[: len(content)]], f"embeddings of image {n}'s tokens")
            span = batch.positions(f"image@{n}")[b].tolist()
            eoi = batch.positions(f"eoi@{n}")[b].tolist()
            assert eoi == [span[-1] + 1], (n, eoi, span[-1])
            spans.append(span)
        assert spans[0][-1] < spans[1][0]
        assert batch.positions("image")[b].tolist() == spans[0] + spans[1]
        assert batch.positions("eoi")[b].tolist() == [spans[0][-1] + 1, spans[1][-1] + 1]
        assert batch.positions("text")[b].tolist() == list(range(spans[1][-1] + 2, batch.length))
        assert batch.positions("between")[b].tolist() == list(range(spans[0][-1] + 2, batch.visuals(b)[1].first))
        assert int(batch.index("image@2[0]")[b]) == int(batch.positions("image_content@2")[b][0])
    for role in ("eoi", "image[0]", "last_image"):
        try:
            vlm.forward(batch, patches=[ng.Patch(role, 1, torch.zeros(2, vlm.hidden_size))])
        except ng.InterventionError as e:
            assert f"{role.split('[')[0]}@1" in str(e) and "one per image" in str(e), str(e)
        else:
            raise AssertionError(f"a patch at {role} with two images was not refused")
    try:
        vlm.forward(batch, capture=ng.Capture("eoi"))
    except ng.InterventionError as e:
        assert "eoi@2" in str(e)
    else:
        raise AssertionError("a capture of eoi with two images was not refused")


def _reference_logits(ref, vlm, batch, edits: dict, hooks=()) -> torch.Tensor:
    reference.EDITS.update(mask=list(edits.get("mask", [])), zero=list(edits.get("zero", [])))
    handles = [layer.register_forward_pre_hook(fn, with_kwargs=True) for layer, fn in hooks]
    try:
        with torch.no_grad():
            return ref(**vlm.model_inputs(batch), use_cache=False).logits
    finally:
        reference.EDITS.update(mask=[], zero=[])
        for h in handles:
            h.remove()


def check_image_interventions(vlm, path) -> None:
    """Per-image knockouts (both modes) and a patch at one image's eoi equal the independent references; the
    shared-prefix conditions equal separate forwards; a capture at eoi@2 is the model's own hidden state there."""
    batch = vlm.prepare(two_images(seed=1), PROMPTS)
    ref = reference.reference_model(path, vlm.family.decoder_layers)
    keep = batch.inputs["attention_mask"].bool()
    plain = vlm.forward(batch).logits
    for src, tgt in (("eoi@1", "text"), ("image@2", "text"), ("image@1[0]", ("eoi@2", "text"))):
        for mode in ("mask", "zero"):
            ours = vlm.forward(batch, knockouts=[ng.Knockout(src, tgt, mode=mode)]).logits
            theirs = _reference_logits(ref, vlm, batch, {mode: [(None, batch.mask(tgt), batch.mask(src))]})
            if not (plain - theirs)[keep].abs().max() > 1e-6:
                raise AssertionError(f"{mode}-mode {src} -> {tgt} changes nothing in the reference")
            close(ours[keep], theirs[keep], f"{mode}-mode {src} -> {tgt} and the eager reference's logits")
    l = 1
    value = torch.randn(batch.size, vlm.hidden_size, generator=torch.Generator().manual_seed(0))
    at = batch.index("eoi@1")

    def pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[torch.arange(h.shape[0]), at] = value.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    ours = vlm.forward(batch, patches=[ng.Patch("eoi@1", l, value)]).logits
    theirs = _reference_logits(ref, vlm, batch, {}, [(vlm.family.decoder_layers(ref)[l], pre)])
    close(ours[keep], theirs[keep], "patch at eoi@1 and the forward pre-hook's logits")
    captured = vlm.forward(batch, capture=ng.Capture("eoi@2")).residuals["eoi@2"]
    hs = hidden(vlm, batch)
    pos = batch.index("eoi@2")
    for r in range(vlm.n_layers):  # HF's last hidden state is after the final norm
        close(captured[:, r], hs[r][torch.arange(batch.size), pos], f"captured eoi@2 residual {r}")
    swap = vlm.forward(batch, capture=ng.Capture(("eoi@1", "eoi@2"))).residuals
    conds = [
        Condition("baseline"),
        Condition("eoi@1->text", knockouts=(ng.Knockout("eoi@1", "text"),)),
        Condition("image@2->text", knockouts=(ng.Knockout("image@2", "text", mode="mask"),)),
        Condition(
            "swap", patches=(ng.Patch("eoi@1", l, swap["eoi@2"][:, l]), ng.Patch("eoi@2", l, swap["eoi@1"][:, l]))
        ),
    ]
    shared = vlm.forward_conditions(batch, conds)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts, patches=c.patches).logits[:, -1]
        close(shared[c.name].last_logits, full, f"shared-prefix and separate logits ({c.name})")


def check_image_blind(vlm) -> None:
    """Image 1 knocked out (mask mode) from everything after it: the text's logits are the same whichever image
    is first (a different image of the same size), and differ without the knockout."""
    ims = images(3, seed=5)
    batch = vlm.prepare([[ims[0], ims[2]], [ims[1], ims[2]]], [PROMPTS[0]] * 2)
    after = ("eoi", "between", "boi@2", "image@2", "text")
    start = int(batch.index("eoi@1")[0])
    base = vlm.forward(batch).logits[:, start:]
    if not (base[0] - base[1]).abs().max() > 1e-4:
        raise AssertionError("the first image does not change the text's logits without a knockout")
    knockout = ng.Knockout("image@1", tuple(r for r in after if batch.mask(r, require=False).any()), mode="mask")
    blind = vlm.forward(batch, knockouts=[knockout]).logits[:, start:]
    close(blind[0], blind[1], "text logits of two first images under the image@1 knockout")


# --- video ---------------------------------------------------------------------------------------------
def clip(n_frames: int = 4, seed: int = 0, size: int = 32) -> ng.Video:
    """A short synthetic clip: ``n_frames`` random frames."""
    return ng.Video(images(n_frames, size=size, seed=seed))


def check_frames(vlm) -> None:
    """``frame@t`` are the model's frames: editing the clip's last input frame changes the embeddings of the last
    ``frame@t``'s tokens and of no other token (the vision towers encode each frame, or Qwen2-VL's pair of merged
    input frames, on its own); every frame has the same number of tokens, frame after frame."""
    video = clip()
    batch = vlm.prepare([video], [CLIP_PROMPT])
    lay = batch.visuals(0)[0]
    frames = [batch.positions(f"frame@{t}")[0].tolist() for t in range(1, len(lay.frames) + 1)]
    assert len(frames) > 1 and len({len(f) for f in frames}) == 1 and sum(frames, []) == lay.content
    assert batch.positions("frame@-1")[0].tolist() == frames[-1]
    assert all(batch.positions(f"frame@{t + 1}[0]")[0].tolist() == [f[0]] for t, f in enumerate(frames))
    edited = video.array.copy()
    edited[-1] = 255 - edited[-1]
    other = vlm.prepare([ng.Video(edited)], [CLIP_PROMPT])
    diff = (hidden(vlm, batch)[0] - hidden(vlm, other)[0])[0].abs().amax(-1)
    changed = torch.nonzero(diff > 1e-6).flatten().tolist()
    if changed != frames[-1]:
        raise AssertionError(f"editing the last frame changed positions {changed}, not frame@-1 {frames[-1]}")


def check_video_interventions(vlm, path) -> None:
    """Knockouts of one frame (both modes) equal the eager reference; the gate scan's batched single-position
    knockouts over the clip equal separate ``frame@t[k] -> text`` forwards."""
    batch = vlm.prepare([clip(seed=1), clip(seed=2)], [CLIP_PROMPT, PROMPTS[1]])
    ref = reference.reference_model(path, vlm.family.decoder_layers)
    keep = batch.inputs["attention_mask"].bool()
    for src in ("frame@2", "frame@-1[0]"):
        for mode in ("mask", "zero"):
            ours = vlm.forward(batch, knockouts=[ng.Knockout(src, "text", mode=mode)]).logits
            theirs = _reference_logits(ref, vlm, batch, {mode: [(None, batch.mask("text"), batch.mask(src))]})
            close(ours[keep], theirs[keep], f"{mode}-mode {src} -> text and the eager reference's logits")
    one = vlm.prepare([clip(seed=3)], [CLIP_PROMPT])
    lay = one.visuals(0)[0]
    names = [f"frame@{t}[{k}]" for t in range(1, len(lay.frames) + 1) for k in (0, -1)]
    sources = torch.zeros(len(names), 1, one.length, dtype=torch.bool)
    for i, name in enumerate(names):
        sources[i, 0, one.index(name)] = True
    prefix = vlm.share_prefix(one, lay.eoi + 1)
    scanned = vlm.forward_knockouts(prefix, sources, mode="mask")[:, 0]
    for i, name in enumerate(names):
        full = vlm.forward(one, knockouts=[ng.Knockout(name, "text", mode="mask")]).logits[0, -1]
        close(scanned[i], full, f"scanned and separate {name} -> text logits")


def check_video_blind(vlm) -> None:
    """Frame 1 knocked out (mask mode) from every later position: the text's logits do not depend on the clip's
    first input frame (which only frame 1 encodes)."""
    video = clip(seed=4)
    edited = video.array.copy()
    edited[0] = 255 - edited[0]
    batch = vlm.prepare([video, ng.Video(edited)], [CLIP_PROMPT] * 2)
    lay = batch.visuals(0)[0]
    start = lay.eoi
    base = vlm.forward(batch).logits[:, start:]
    if not (base[0] - base[1]).abs().max() > 1e-4:
        raise AssertionError("the first frame does not change the text's logits without a knockout")
    later = tuple(f"frame@{t}" for t in range(2, len(lay.frames) + 1)) + ("eol", "eoi", "text")
    later = tuple(r for r in later if batch.mask(r, require=False).any())
    blind = vlm.forward(batch, knockouts=[ng.Knockout("frame@1", later, mode="mask")]).logits[:, start:]
    close(blind[0], blind[1], "text logits of two clips differing in frame 1 under the frame@1 knockout")
