"""The user-interest vector: any positive common scale of the weights gives the same scores, and a history
that sums to nothing is the caller's error, never a NaN or a silent zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.server.engine import user_vector
from recserve.server.errors import InvalidArgument
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_model import fake_model
from tests.support.serving import serving

HISTORY = np.random.default_rng(7).standard_normal((6, 16)).astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.floats(1e-3, 1e3), min_size=6, max_size=6),
    exponent=st.integers(-300, 300),
)
def test_any_common_scale_of_the_weights_gives_the_same_vector(weights: list[float], exponent: int) -> None:
    base = np.asarray(weights, dtype=np.float64)
    scaled = base * 10.0**exponent
    np.testing.assert_allclose(user_vector(scaled, HISTORY), user_vector(base, HISTORY), atol=1e-6)


def test_a_history_that_cancels_out_is_invalid() -> None:
    opposite = np.stack([HISTORY[0], -HISTORY[0]])
    with pytest.raises(InvalidArgument, match="sum to zero"):
        user_vector(np.ones(2), opposite)


@pytest.mark.parametrize("similarity", [pb.SIMILARITY_COSINE, pb.SIMILARITY_DOT])
def test_scores_over_grpc_do_not_move_with_the_scale_of_the_weights(similarity: int) -> None:
    """float32 on the wire: every scale of its normal range, the bug's 1e-14 among them."""
    history = ["hiking boots", "trail socks", "tent", "camping stove"]
    candidates = ["nike pegasus", "cast iron pan", "rain jacket"]
    weights = [0.5, 1.0, 0.25, 2.0]
    with serving(Path("fake"), fake_model(), metrics_port=None) as server:
        stub = server.stub()

        def scores(scale: float) -> np.ndarray:
            request = pb.ScoreRequest(
                user_history=pb.UserHistory(texts=history, weights=[w * scale for w in weights]),
                candidates=candidates,
                similarity=similarity,  # type: ignore[arg-type]
            )
            return np.asarray(stub.Score(request).scores)

        reference = scores(1.0)
        for exponent in range(-36, 37, 3):
            np.testing.assert_allclose(scores(10.0**exponent), reference, atol=1e-6, err_msg=f"1e{exponent}")
