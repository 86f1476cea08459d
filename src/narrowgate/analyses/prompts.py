"""The paper's prompts and defaults, in one place (each family's template is applied by its adapter)."""

VQA = "{question}\nAnswer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
CLASS = {"imagenet": "This animal is a", "synthetic": "This shape is a"}
NEW_TOKENS = {"vqa": 20, "captions": 60}


def class_prompt(cfg: dict) -> str:
    return cfg.get("prompt") or CLASS.get(cfg["data"], CLASS["imagenet"])


def word_token(tokenizer, word: str) -> int:
    """The class word's token: the first token of " <word>" (leading space), derived, never hand-picked."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The tokenizer turns {word!r} into no token.")
    return int(ids[0])
