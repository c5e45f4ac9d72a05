"""Launch configuration of the row kernels, chosen in one place (docs/design.md §5,
rule 3)."""


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def row_block_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a kernel that walks one row of ``n_cols`` elements in blocks.

    Blocks up to 4096 elements keep about 16 fp32 values per thread per live array at 8 warps,
    which leaves room for the ~10 arrays the token-loss backward holds; short rows get one
    block and fewer warps.
    """
    block = min(_next_power_of_2(max(n_cols, 1)), 4096)
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps
