"""Checks that several family test modules share."""

from __future__ import annotations

import torch


def contains(seq, sub) -> bool:
    """Whether ``sub`` occurs in ``seq`` as a contiguous run."""
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def check_forward_and_generate(vlm, batch, **generate_kwargs):
    """Finite logits at every position; generation appends 4 tokens to the unchanged prompt."""
    out = vlm.forward(batch)
    assert out.logits.shape[:2] == batch.input_ids.shape and torch.isfinite(out.logits).all()
    gen = vlm.generate(batch, max_new_tokens=4, **generate_kwargs)
    assert gen.shape == (2, batch.length + 4)
    assert torch.equal(gen[:, : batch.length], batch.input_ids)


def check_bracketed_span(batch, b, image_id, boi_id, eoi_id, n_image):
    """Roles of row ``b`` where the image is ``n_image`` image tokens, all content and no eol, right between
    a boi and an eoi token, and the text follows the eoi (Chameleon, Janus, Qwen2-VL).

    Returns the image positions, boi and eoi, for the family's own checks.
    """
    ids = batch.input_ids
    img = batch.positions("image")[b]
    assert torch.equal(img, torch.nonzero(ids[b] == image_id).flatten())
    assert img.numel() == n_image
    assert torch.equal(batch.positions("image_content")[b], img)
    assert batch.positions("eol")[b].numel() == 0
    boi = int(batch.index("boi")[b])
    assert boi == int(img[0]) - 1 and int(ids[b, boi]) == boi_id
    eoi = int(batch.index("eoi")[b])
    assert eoi == int(img[-1]) + 1 and int(ids[b, eoi]) == eoi_id
    assert int(batch.index("first_image")[b]) == int(img[0])
    assert int(batch.index("last_image")[b]) == int(img[-1])
    assert int(batch.index("image[3]")[b]) == int(img[3])
    assert torch.equal(batch.positions("internal_image")[b], img[1:-1])
    assert batch.positions("text")[b].tolist() == list(range(eoi + 1, ids.shape[1]))
    return img, boi, eoi
