"""What a sweep is doing and what it found, read from the manifest, SLURM and the run directories; none of
it submits or cancels anything.

    status    one row per run: jobs, standing, progress, the last loss and top-1
    progress  the live view of `--local` runs, read from the files their trainers write
    results   the report's rows, collected once for the table and the figures
    report    `sogclr-submit report`: table (terminal, md, csv, json) and figures
    figures   the PNGs, drawn headless
"""
