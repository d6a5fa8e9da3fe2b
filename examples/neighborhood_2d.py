"""2-D neighborhood attention: each pixel attends to the KERNEL x KERNEL pixels around it.

Papers: Hassani, Walton, Li, Li & Shi, "Neighborhood Attention Transformer", CVPR 2023;
Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022 (dilation). NATTEN rules:
windows are centred and shifted inward at the image border, so every query sees exactly
KERNEL**2 keys; with dilation the window picks every DILATION-th pixel of the query's residue
class. Tokens are the GRID's pixels flattened row-major. See ``attncc.masks.neighborhood``.

Default sizes: BATCH=2, HEADS=4, GRID=(16, 16) so SEQ_LEN=256 (fixed by the grid), HEAD_DIM=32,
KERNEL=5; ``neighborhood_2d_dilated`` uses DILATION=2. Run: ``python examples/neighborhood_2d.py``.
"""

import attncc
from attncc import masks
from attncc.testing import check_example

BATCH, HEADS, HEAD_DIM = 2, 4, 32
GRID = (16, 16)
SEQ_LEN = GRID[0] * GRID[1]
KERNEL, DILATION = 5, 2


def generate_neighborhood_mask(kernel_size: int, grid: tuple[int, int], dilation: int = 1):
    return masks.neighborhood(kernel_size, dilation=dilation, grid=grid)


neighborhood_mask = generate_neighborhood_mask(KERNEL, GRID)
dilated_neighborhood_mask = generate_neighborhood_mask(KERNEL, GRID, DILATION)
neighborhood_2d = attncc.variant(mask=neighborhood_mask, name="neighborhood_2d")
neighborhood_2d_dilated = attncc.variant(mask=dilated_neighborhood_mask, name="neighborhood_2d_dilated")


def main(backend: str | None = None) -> None:
    for var in (neighborhood_2d, neighborhood_2d_dilated):
        check_example(var, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"{var.name} {GRID} kernel {KERNEL}")


if __name__ == "__main__":
    main()
