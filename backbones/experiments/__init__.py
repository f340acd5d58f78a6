"""The paper's experiments: the degradation problem of plain networks against residual ones (`degradation`,
tools/degradation.py; He et al. 2015, Sec. 4.2, Fig. 6)."""
