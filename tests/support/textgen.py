"""Test fixtures the suite makes itself: English-like text and a GPT-2-style BPE trained on it.

Tests must pass on a fresh clone with nothing beside it, so no test reads GPT-2's
files or a downloaded corpus. Instead a seeded grammar writes a play (speaker
lines, sentences with agreement and topic words that recur within a speech), so
a small model has structure to learn, and HF `tokenizers` trains a byte-level BPE
on it that is saved exactly like GPT-2's `vocab.json` + `merges.txt` (byte-level
alphabet, GPT-2's pre-tokenizer regex, `<|endoftext|>` as the last id), so the
`GPT2BPETokenizer` path runs as it does with GPT-2's own files.

For the tokenizer types a user brings (issue 16) there is a second kind of text, documents of made-up words
with punctuation, digits and non-ASCII (`make_texts`), and the two tokenizers trained on it: a byte-level
BPE in HF's tokenizer.json whose vocabulary exceeds 65,535 ids, and a SentencePiece model.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

EOD = "<|endoftext|>"

NAMES = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR", "CAPULET", "MONTAGUE", "TYBALT", "BENVOLIO", "PARIS",
         "PRINCE", "LADY CAPULET", "PETER", "SAMPSON", "GREGORY", "BALTHASAR", "ABRAHAM", "ESCALUS", "HAMLET",
         "OPHELIA", "HORATIO", "LAERTES", "POLONIUS", "GERTRUDE", "CLAUDIUS", "OSRIC", "FRANCISCO", "BERNARDO"]
# topic -> (nouns, adjectives, verbs in base form): a speech keeps to one topic, so context predicts words
TOPICS = {
    "war": ("sword army battle soldier shield enemy banner fortress horse captain spear trumpet arrow camp wound "
            "general drum helmet siege victory".split(),
            "bloody brave fierce iron ancient proud broken loyal mighty weary".split(),
            "strike defend command follow betray conquer guard fear wound besiege".split()),
    "love": ("heart kiss lady rose letter ring tear promise lover night sigh balcony garden moon glove song "
             "vow sonnet blush embrace".split(),
             "sweet gentle fair tender secret true pale dear lovely faithful".split(),
             "love keep remember seek hold praise forget trust kiss marry".split()),
    "sea": ("ship wave storm sailor harbour island anchor tide fish shore mast compass pirate rope gull "
            "current lighthouse cargo voyage reef".split(),
            "salt dark restless distant cold wild grey deep stormy calm".split(),
            "sail cross watch reach leave drown find call steer wreck".split()),
    "court": ("king queen crown throne duke law servant palace gold feast jester sceptre council chamber "
              "banquet treasury herald courtier decree ambassador".split(),
              "royal noble wise false rich old young great cunning solemn".split(),
              "rule serve judge crown pardon summon honour rob flatter banish".split()),
    "field": ("farmer wheat orchard cow river meadow harvest barn apple spring plough shepherd sheep hedge "
              "cottage mill goose pasture vineyard scythe".split(),
              "green golden quiet early fresh heavy open warm fertile humble".split(),
              "plant gather feed carry water sell count mend reap milk".split()),
    "church": ("friar prayer bell altar candle saint sermon sin grave abbey chapel monk cross psalm pilgrim "
               "soul heaven confession blessing vigil".split(),
               "holy silent humble sacred grave solemn pious weary blessed mortal".split(),
               "bless pray confess forgive bury preach kneel absolve chant mourn".split()),
    "town": ("market merchant street tavern coin baker cart bridge gate square wall guild lantern inn "
             "apprentice wagon fountain alley tailor mason".split(),
             "busy narrow crowded muddy bright poor honest idle merry clever".split(),
             "buy trade visit build sweep open close cheat hire wander".split()),
    "ghost": ("ghost spirit shadow tomb midnight skull raven crypt owl curse spectre mist bone chain "
              "lantern witch cauldron grave omen phantom".split(),
              "cold pale dreadful hollow restless wicked strange silent ghastly eerie".split(),
              "haunt follow frighten whisper vanish curse appear wander warn wail".split()),
}
NUMBERS = "two three four five six seven ten twenty a hundred a thousand".split()
PREPOSITIONS = ["with", "under", "near", "beyond", "against", "before", "upon", "without", "within", "across"]
ADVERBS = ["tonight", "again", "at dawn", "in silence", "for ever", "too soon", "by my faith", "once more",
           "in the year 1592", "by noon", "on the 3rd of May", "at 10 o'clock"]
EXCLAIM = ["O", "Alas", "Ay me", "Fie", "Marry", "Good morrow", "Peace", "Hark", "Soft", "Hence"]


def _third(verb: str) -> str:
    """strike -> strikes, cross -> crosses, marry -> marries."""
    if verb.endswith(("s", "sh", "ch", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _plural(noun: str) -> str:
    return _third(noun) if not noun.endswith("f") else noun[:-1] + "ves"


def _zipf(rng: random.Random, words: list) -> str:
    """Frequent words first, like real text (weights 1/rank)."""
    return rng.choices(words, weights=[1.0 / (i + 1) for i in range(len(words))])[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, nouns: list, adjs: list, speaker: str, names: list,
                 counted: bool = True) -> str:
    """A name, 'the/my/a [adj] noun', or (objects only, so verbs agree) 'three [adj] nouns'."""
    r = rng.random()
    if r < 0.12:
        return rng.choice([n for n in names if n != speaker]).title()
    noun = _zipf(rng, nouns)
    adj = _zipf(rng, adjs) + " " if rng.random() < 0.45 else ""
    if counted and r < 0.2:
        return f"{rng.choice(NUMBERS)} {adj}{_plural(noun)}"
    det = rng.choice(["the", "the", "my", "thy", "a", "this", "that"])
    if det == "a":
        det = _article(adj or noun)
    return f"{det} {adj}{noun}"


def _sentence(rng: random.Random, topic: str, speaker: str) -> str:
    nouns, adjs, verbs = TOPICS[topic]
    subj = _noun_phrase(rng, nouns, adjs, speaker, NAMES, counted=False)
    obj = _noun_phrase(rng, nouns, adjs, speaker, NAMES)
    kind = rng.random()
    if kind < 0.55:
        s = f"{subj} {_third(_zipf(rng, verbs))} {obj}"
        if rng.random() < 0.4:
            s += f" {rng.choice(PREPOSITIONS)} {_noun_phrase(rng, nouns, adjs, speaker, NAMES)}"
        if rng.random() < 0.3:
            s += " " + rng.choice(ADVERBS)
        end = "."
    elif kind < 0.75:   # questions invert with "doth" and take the base verb
        s = f"doth {subj} {_zipf(rng, verbs)} {obj}"
        end = "?"
    elif kind < 0.9:
        s = f"{rng.choice(EXCLAIM)}, {subj}"
        end = "!"
    else:
        s = f"I will {_zipf(rng, verbs)} {obj}, and {subj} shall know it"
        end = "."
    return s[0].upper() + s[1:] + end


def english_like_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic play text of about `n_chars` characters: 'NAME:\\nsentences\\n\\n' speeches."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        speaker, topic = rng.choice(NAMES), rng.choice(list(TOPICS))
        lines = []
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(_sentence(rng, topic, speaker) for _ in range(rng.randint(1, 3))))
        speech = f"{speaker}:\n" + "\n".join(lines) + "\n\n"
        parts.append(speech)
        size += len(speech)
    return "".join(parts)


def paragraphs(text: str) -> list:
    return [p + "\n\n" for p in text.split("\n\n") if p.strip()]


def train_gpt2_style_bpe(text: str, out_dir: Path, vocab_size: int = 2000) -> tuple[Path, Path]:
    """Byte-level BPE on `text`, written as GPT-2's vocab.json/merges.txt; returns their paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOD] = len(vocab)   # GPT-2 keeps the end-of-document token at the last id
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merge_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merge_file


# ----- made-up-word documents and the user tokenizers trained on them (issue 16) -----------------------------
SYLLABLES = ["ka", "to", "ri", "an", "mo", "se", "lu", "pe", "di", "no", "gra", "sto", "ve", "qu", "ix", "ba", "el"]


def make_texts(n: int, seed: int = 0) -> list:
    """Sentences of made-up words with punctuation, digits and some non-ASCII; a few empty documents."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    words += ["naïve", "café", "東京", "Ünïcode", "1984", "3.14"]
    out = []
    for i in range(n):
        if i % 37 == 5:
            out.append("")
            continue
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".!?")
                 for _ in range(rng.randint(1, 4))]
        out.append(" ".join(sents) + ("\n" if i % 3 == 0 else ""))
    return out


def train_hf_bpe(texts: list, out_dir: Path) -> str:
    """Byte-level BPE trained on `texts`; <s> added by its post-processor; the vocabulary extended past 65,535
    ids. Saved as `out_dir`/tokenizer.json; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for i in range(66000 - len(vocab)):            # reserved ids no merge reaches: a 66,000-id vocabulary
        vocab[f"<reserved_{i}>"] = len(vocab)
    big = Tokenizer.from_str(json.dumps(state))
    big.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    big.save(str(out_dir / "tokenizer.json"))
    return str(out_dir)


def train_sentencepiece(texts: list, out_dir: Path) -> str:
    """A 300-piece unigram SentencePiece model trained on the non-empty `texts`; returns the .model path."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in texts if t]),
                                   model_prefix=str(out_dir / "sp"), vocab_size=300, model_type="unigram",
                                   minloglevel=2)
    return str(out_dir / "sp.model")


def tokenizer_flags(kind: str, hf_bpe: str, spm_model: str) -> list:
    """The `gpt3d` flags that name the BPE ("bpe") or the SentencePiece model (anything else)."""
    if kind == "bpe":
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe]
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model]
