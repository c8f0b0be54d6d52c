"""Helpers shared by the tests and the benchmarks: a real local SLURM cluster (`slurm_cluster`), the
smallest real sweep spec (`tiny`), end-to-end waits on SLURM and run directories (`e2e`), and runs to
compare bit for bit (`runs`)."""
