"""The pieces of phase 5 (``agentforge.phases.curriculum``), each usable and testable alone:

tasks      task source: families, difficulty levels, variants, held-out sets, tool demonstrations
hints      failure diagnosis and the escalating hint ladder
state      the per-level question state machine (variants, mastery, hints, skips)
rows       training examples (answers, hinted answers, tool traces, self-samples) and packing
selfmodel  temperature-tagged self-prediction and dreams
measure    held-out scores, the edge-of-chaos baseline, bootstrap intervals, tool accuracy
loop       the level loop that ties them together
"""
