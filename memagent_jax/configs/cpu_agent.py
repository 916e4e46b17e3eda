"""The agent settings of the CPU main job, shared by every recipe's CPU block (plain values, no imports).

tiny_synthetic (the main job), grpo:cpu and evaluate:cpu use one set of budgets and one wording, so a model
trained by one runs under the others with the same prompts.
"""

# Token budgets: question 16, chunk 32, memory 8, answer 12; two chunks per compiled scan.
BUDGETS = dict(question_tokens=16, chunk_tokens=32, memory_tokens=8, answer_tokens=12, chunks_per_segment=2)

# Compact wording for tiny models: ~30 template tokens per prompt instead of the default templates' ~110 with a
# small tokenizer, which halves the CPU time of every step. Same placeholders and shape as the defaults.
MEMORY_UPDATE = "Question: {question}\nNotes: {memory}\nText: {chunk}\nRewrite the notes."
FINAL_ANSWER = "Question: {question}\nNotes: {memory}\nAnswer with \\boxed{}."
INITIAL_MEMORY = "No notes yet."
TEMPLATES = dict(memory_update=MEMORY_UPDATE, final_answer=FINAL_ANSWER, initial_memory=INITIAL_MEMORY)

# The synthetic task of the cpu variants when no data file is given: the main job's keyed_recall (one keyed fact
# in a haystack) over two chunks, so that questions and answers fit the budgets above.
SYNTHETIC_TASK = "keyed_recall"
SYNTHETIC_TOKENS = 2 * BUDGETS["chunk_tokens"]
