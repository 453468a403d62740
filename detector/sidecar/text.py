"""Token ids -> the text the API client received, with each token's character offsets.

The sidecar decodes exactly as vLLM's fast detokenizer does (``tokenizers``' DecodeStream,
primed with the end of the prompt, special tokens skipped), so span offsets index into the
``text`` field of the client's response. Only ``tokenizer.json`` is read: no transformers
import in the sidecar.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

PRIME_TOKENS = 8  # prompt tokens that prime decoding of the first generated piece


@dataclass(frozen=True, slots=True)
class DecodedText:
    text: str
    # Character range of generated token i in ``text``: [starts[i], ends[i]).
    starts: list[int]
    ends: list[int]

    @classmethod
    def from_pieces(cls, pieces: Sequence[str]) -> DecodedText:
        """The text of consecutive token pieces, each token's characters where its piece lies."""
        starts, ends, pos = [], [], 0
        for piece in pieces:
            starts.append(pos)
            pos += len(piece)
            ends.append(pos)
        return cls("".join(pieces), starts, ends)


class TextDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> TextDecoder | None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            logger.warning("no tokenizer.json in %s: token text and spans are unavailable",
                           model_dir)
            return None
        return cls(Tokenizer.from_file(str(path)))

    def text_of(self, token_ids: Sequence[int]) -> str:
        """Plain text of some tokens (special tokens skipped), e.g. the prompt's tail."""
        ids = [t for t in token_ids if t >= 0]
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        except Exception:  # an id outside the vocabulary: no text rather than no verdict
            return ""

    def stream(self, prompt_tail: Sequence[int] = ()) -> PieceStream:
        """An incremental decoder of one request's generated tokens (see :meth:`decode`)."""
        return PieceStream(self.tokenizer, prompt_tail)

    def decode(self, generated: Sequence[int], prompt_tail: Sequence[int] = ()) -> DecodedText:
        """Decode generated tokens; unknown tokens (-1) decode to nothing.

        Only the last ``PRIME_TOKENS`` of ``prompt_tail`` prime the decoder, as vLLM's
        incremental detokenizer does."""
        stream = self.stream(prompt_tail)
        return DecodedText.from_pieces([stream.step(token) for token in generated])


class PieceStream:
    """One request's generated tokens -> their text pieces, one token at a time, as vLLM's
    detokenizer produces them: a request's text is decoded once as its tokens arrive, not
    again from the start at every read. ``decoded`` counts the tokens stepped."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        prime = list(prompt_tail)[-PRIME_TOKENS:]
        self._stream = DecodeStream(ids=prime, skip_special_tokens=True) if prime \
            else DecodeStream(skip_special_tokens=True)
        self.decoded = 0

    def step(self, token: int) -> str:
        """The text token ``token`` adds (unknown tokens, -1, add nothing)."""
        self.decoded += 1
        if token < 0:
            return ""
        try:
            return self._stream.step(self.tokenizer, token) or ""
        except Exception:  # vLLM resets on invalid UTF-8 prefixes; so do we
            self._stream = DecodeStream(skip_special_tokens=True)
            return self._stream.step(self.tokenizer, token) or ""
