"""The model makes its own training data: a sampling engine built for synthesis (many samples per
prompt, resumable, with provenance) and the research's self-synthesis methods on top of it —
SELF-GUIDE (synthesise inputs and outputs, filter, vote, fine-tune), LiST self-training (teacher
adapter pseudo-labels an unlabelled pool, a student adapter learns from confidence-weighted labels),
knowledge-preference data (instruction > context > parametric knowledge) and linguistically-diverse
prompts for a low-resource language."""
