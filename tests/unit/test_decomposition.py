import pytest

from mpidd.decomposition import (Decomposition, DecompositionError, parse_grid, rank_of_subdomain,
                                 subdomains_of_rank)


def covered(dec):
    hit = set()
    for i in range(dec.num_subdomains):
        (y0, y1), (x0, x1) = dec.box(i)
        hit |= {(y, x) for y in range(y0, y1) for x in range(x0, x1)}
    return hit


def test_parse_grid():
    assert parse_grid("2x2") == (2, 2)
    assert parse_grid("4X4x2") == (4, 4, 2)
    for bad in ("2x", "axb", "0x2", "-1x2"):
        with pytest.raises(DecompositionError):
            parse_grid(bad)


def test_2x2_tiles_28x28_without_overlap():
    dec = Decomposition((28, 28), (2, 2), 0)
    assert dec.subimage_shape == (14, 14)
    assert dec.boxes() == [((0, 14), (0, 14)), ((0, 14), (14, 28)), ((14, 28), (0, 14)), ((14, 28), (14, 28))]
    assert dec.coords(1) == (0, 1) and dec.coords(2) == (1, 0)


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (2, 4), (1, 4), (7, 7), (3, 3), (5, 2)])
@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_equal_shapes_inside_image_and_full_cover(grid, overlap):
    shape = (28, 28)
    dec = Decomposition(shape, grid, overlap)
    sub = dec.subimage_shape
    for i in range(dec.num_subdomains):
        box = dec.box(i)
        assert tuple(hi - lo for lo, hi in box) == sub
        assert all(0 <= lo < hi <= L for (lo, hi), L in zip(box, shape))
    assert len(covered(dec)) == 28 * 28


def test_overlap_extends_interior_boxes():
    dec = Decomposition((28, 28), (2, 2), 2)
    assert dec.subimage_shape == (18, 18)
    # interior edges reach 2 pixels into the neighbour; border boxes shift inwards
    assert dec.box(0) == ((0, 18), (0, 18))
    assert dec.box(3) == ((10, 28), (10, 28))


@pytest.mark.parametrize("shape,grid,overlap", [((16, 16), (2, 2), 3), ((64, 64), (4, 4), 8),
                                                ((8, 12, 16), (2, 1, 4), 2)])
def test_tiles_partition_the_image_and_sit_inside_their_boxes(shape, grid, overlap):
    """A dense subdomain predicts its tile (the box of overlap 0) from its box: the tiles cover
    every pixel once, and crop(i) cuts the tile out of the box, border boxes shifted inwards."""
    import numpy as np
    dec, tiles = Decomposition(shape, grid, overlap), Decomposition(shape, grid, 0)
    image = np.arange(np.prod(shape)).reshape(shape)
    count = np.zeros(shape, int)
    for i in range(dec.num_subdomains):
        assert dec.tile(i) == tiles.box(i) and dec.tile_slices(i) == tiles.slices(i)
        count[dec.tile_slices(i)] += 1
        assert np.array_equal(image[dec.slices(i)][dec.crop(i)], image[dec.tile_slices(i)])
        assert image[dec.tile_slices(i)].shape == dec.tile_shape == tiles.subimage_shape
    assert (count == 1).all()
    if shape == (64, 64):  # 16-pixel tiles in 32-pixel boxes: the first box starts at the border
        assert dec.crop(0) == (slice(0, 16), slice(0, 16)) and dec.crop(5) == (slice(8, 24), slice(8, 24))
        assert dec.crop(15) == (slice(16, 32), slice(16, 32))


def test_axis_with_one_part_gets_no_overlap():
    dec = Decomposition((28, 28), (1, 4), 1)
    assert dec.subimage_shape == (28, 9)


def test_refuses_grid_and_overlap_that_do_not_fit():
    with pytest.raises(DecompositionError, match="at most 28 parts"):
        Decomposition((28, 28), (29, 1))
    with pytest.raises(DecompositionError, match="at most 7"):
        Decomposition((28, 28), (2, 2), 8)
    Decomposition((28, 28), (2, 2), 7)  # the limit itself fits
    with pytest.raises(DecompositionError, match="factors"):
        Decomposition((28, 28), (2, 2, 2))
    with pytest.raises(DecompositionError):
        Decomposition((28, 28), (2, 2), -1)


def test_3d_grid():
    dec = Decomposition((8, 16, 16), (2, 2, 2), 1)
    assert dec.num_subdomains == 8
    assert dec.subimage_shape == (6, 10, 10)
    assert dec.coords(7) == (1, 1, 1)


def test_round_robin_rank_map():
    assert subdomains_of_rank(0, 4, 4) == [0]
    assert subdomains_of_rank(1, 2, 4) == [1, 3]
    assert subdomains_of_rank(0, 1, 4) == [0, 1, 2, 3]
    assert [rank_of_subdomain(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    owned = sorted(i for r in range(3) for i in subdomains_of_rank(r, 3, 16))
    assert owned == list(range(16))
    with pytest.raises(DecompositionError, match="at most 4 ranks"):
        subdomains_of_rank(0, 5, 4)


def test_choose_grid_follows_the_rank_count():
    from mpidd.decomposition import MAX_ASPECT, choose_grid, format_grid, layout
    expected = {1: (2, 2), 2: (1, 2), 3: (2, 2), 4: (2, 2), 5: (3, 3), 6: (2, 3), 7: (3, 3), 8: (2, 4), 9: (3, 3),
                10: (4, 4), 12: (3, 4), 15: (3, 5), 16: (4, 4)}
    for ranks, grid in expected.items():
        chosen, why = choose_grid(ranks, (28, 28))
        assert chosen == grid, (ranks, chosen)
        dec = Decomposition((28, 28), chosen, 0)
        assert dec.num_subdomains >= ranks  # every mode runs: no rank without a subdomain
        assert layout(ranks - 1, ranks, dec.num_subdomains)[1] == 1
        one_each = dec.num_subdomains == ranks
        assert ("one subdomain per rank" in why) == one_each and why.startswith(f"grid auto: {format_grid(grid)}")
        if one_each:
            assert max(dec.subimage_shape) <= MAX_ASPECT * min(dec.subimage_shape)
    assert choose_grid(8, (16, 16, 16))[0] == (2, 2, 2)  # volumes
    assert choose_grid(4, (64, 16))[0] == (4, 1)  # the long axis is cut
    with pytest.raises(DecompositionError, match="give --grid"):
        choose_grid(10, (3, 3))


def test_grid_neighbour_steps_along_one_axis_in_c_order():
    from mpidd.decomposition import grid_neighbour
    dec = Decomposition((12, 12, 12), (2, 3, 2), 0)
    for i in range(dec.num_subdomains):
        for axis in range(3):
            for step in (-1, 1):
                j = grid_neighbour(dec.grid, i, axis, step)
                moved = list(dec.coords(i))
                moved[axis] += step
                inside = 0 <= moved[axis] < dec.grid[axis]
                assert (j is None) != inside and (j is None or dec.coords(j) == tuple(moved)), (i, axis, step)
