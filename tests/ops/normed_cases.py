"""Operands shared by the norm-fusion op tests (test_normed_input.py, test_normed_input_autocast.py): a norm over
H features of (3, 5, H) inputs feeding a LoRA linear (N outputs) and a gated MLP (intermediate INTER).
H, N, INTER and the ranks (4; 3, 5, 7) are not powers of two."""
import torch

H, N, INTER = 40, 24, 36


def norm_and_lora_params(seed: int = 0) -> dict:
    """x, the norm's weight and bias, one LoRA linear (w, a, b) and a gated MLP's (w_p, a_p, b_p), p in g, u, d."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen) * s[-1] ** -0.5  # noqa: E731
    return {"x": torch.randn(3, 5, H, generator=gen), "norm_w": 1.0 + 0.1 * torch.randn(H, generator=gen),
            "norm_b": 0.1 * torch.randn(H, generator=gen),
            "w": rand(N, H), "a": rand(4, H), "b": rand(N, 4), "w_g": rand(INTER, H), "a_g": rand(3, H),
            "b_g": rand(INTER, 3), "w_u": rand(INTER, H), "a_u": rand(5, H), "b_u": rand(INTER, 5),
            "w_d": rand(H, INTER), "a_d": rand(7, INTER), "b_d": rand(H, 7)}
