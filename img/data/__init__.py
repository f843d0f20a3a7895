"""Data the project makes itself: the shapes world and its Pick-a-Pic-format samples.

    from img.data.sample import write_sample
    write_sample("data", pairs=200, seed=0)
"""
