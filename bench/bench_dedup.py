"""ROUGE-L dedup: instruct.self_instruct.dedup.dedup against the naive rouge-score pass, same data.

    python bench/bench_dedup.py                       # naive timed on the first 200 candidates
    python bench/bench_dedup.py --naive-sample 500
    python bench/bench_dedup.py --full                # naive on every candidate (~10+ minutes)

The naive pass scores each candidate against every pool item with rouge-score (as Alpaca's
generate_instruction.py does), so its cost is proportional to the number of pairs. With a
sample, its per-pair time is measured on the first N candidates (exact, same growing pool) and
the full run is projected from the pair count that the full run would score.
"""

from __future__ import annotations

import argparse
import random
import time

from instruct.self_instruct.dedup import Decision, dedup, naive_dedup

# Topics are adjective + noun (20 x 30 = 600), so fills of one template rarely coincide.
TOPIC_ADJ = [
    "ancient",
    "urban",
    "modern",
    "tiny",
    "forgotten",
    "electric",
    "rural",
    "medieval",
    "digital",
    "local",
    "tropical",
    "abandoned",
    "competitive",
    "sustainable",
    "everyday",
    "famous",
    "underwater",
    "futuristic",
    "homemade",
    "seasonal",
]
TOPIC_NOUN = [
    "bridges",
    "gardens",
    "markets",
    "trains",
    "libraries",
    "festivals",
    "robots",
    "forests",
    "bakeries",
    "startups",
    "museums",
    "islands",
    "volcanoes",
    "orchestras",
    "bicycles",
    "hospitals",
    "schools",
    "satellites",
    "recipes",
    "neighbourhoods",
    "chess clubs",
    "rivers",
    "video games",
    "farms",
    "airports",
    "languages",
    "bees",
    "lighthouses",
    "newspapers",
    "deserts",
]
SLOTS = {
    "style": ["short", "funny", "formal", "heartfelt", "rhyming", "persuasive", "concise",
              "sarcastic", "melancholic", "upbeat", "minimalist", "dramatic"],
    "form": ["poem", "story", "essay", "speech", "song", "limerick", "blog post", "tweet",
             "haiku", "dialogue", "fable", "product description", "news article", "riddle"],
    "audience": [
        "a five-year-old", "a high school student", "a busy executive", "a new employee",
        "a retired teacher", "a beginner programmer", "your grandmother", "a tourist",
        "a skeptical investor", "a nurse on night shift", "a first-time voter", "a chef",
        "a college freshman", "a farmer", "an astronaut", "a museum visitor",
    ],
    "concept": [
        "photosynthesis", "inflation", "recursion", "blockchain", "the immune system",
        "supply and demand", "machine learning", "gravity", "compound interest", "DNS",
        "public key cryptography", "the water cycle", "natural selection", "a hash table",
        "plate tectonics", "opportunity cost", "garbage collection", "the placebo effect",
        "quantum entanglement", "game theory", "vaccination", "TCP handshakes", "entropy",
        "the Pythagorean theorem", "confirmation bias", "gradient descent", "tides",
        "the electoral college", "climate feedback loops", "virtual memory",
    ],
    "count": ["three", "five", "two", "four", "ten", "seven", "six", "eight"],
    "activity": [
        "studying for exams", "saving money", "sleeping better", "running a marathon",
        "learning a language", "writing clean code", "public speaking", "cooking at home",
        "managing stress", "negotiating a salary", "growing tomatoes", "taking photos at night",
        "reducing screen time", "making friends in a new city", "training a puppy",
    ],
    "context": ["on a budget", "while travelling", "at work", "with young kids", "in winter",
                "after an injury", "in a small apartment", "without a car", "as a student"],
    "doc": ["paragraph", "article", "email", "news report", "product review", "letter",
            "meeting transcript", "research abstract", "press release", "contract clause"],
    "aspect": ["main argument", "tone", "key numbers", "technical terms", "humour",
               "action items", "legal risks", "timeline"],
    "lang": ["Python", "JavaScript", "Rust", "Go", "SQL", "C++", "Java", "Haskell", "Bash"],
    "task": [
        "reverses a linked list", "checks whether a string is a palindrome",
        "merges two sorted arrays", "counts the words in a file", "finds duplicate emails",
        "computes the nth Fibonacci number", "parses a CSV file into a dictionary",
        "validates an IPv4 address", "flattens a nested list", "rotates a matrix",
        "removes stop words from a sentence", "finds the longest common prefix",
        "converts Roman numerals to integers", "schedules meetings without overlap",
    ],
    "tone": ["polite", "professional", "casual", "enthusiastic", "neutral", "confident",
             "empathetic", "firm", "playful"],
    "adj": ["catchy", "creative", "memorable", "short", "unusual", "elegant", "punny", "bold"],
    "business": ["coffee shop", "bakery", "tech startup", "bookstore", "yoga studio", "podcast",
                 "food truck", "law firm", "pet hotel", "bike repair shop", "florist"],
    "ingredient": ["chickpeas", "spinach", "salmon", "lentils", "tofu", "sweet potatoes", "rice",
                   "mushrooms", "quinoa", "eggplant", "feta", "black beans", "coconut milk"],
    "goal": [
        "lose weight", "learn the guitar", "read more books", "switch careers into data science",
        "train for a 10k run", "improve their credit score", "wake up earlier",
        "write a novel", "pass a driving test", "learn to swim", "start a vegetable garden",
    ],
    "period": ["one-week", "30-day", "three-month", "weekend", "six-week", "daily"],
    "request": [
        "for a deadline extension", "for feedback on a proposal", "for a day off next Friday",
        "to reschedule our meeting", "for a raise", "for access to the shared drive",
        "to approve a training budget", "about the new parking policy",
    ],
    "label": ["positive or negative", "spam or not spam", "fact or opinion",
              "formal or informal", "urgent or routine", "sarcastic or sincere"],
    "item": ["tweet", "sentence", "customer review", "headline", "email subject line",
             "support ticket", "movie quote"],
    "city": ["Lisbon", "Nairobi", "Kyoto", "Montreal", "Lima", "Oslo", "Hanoi", "Chicago"],
    "person": ["Marie Curie", "Alan Turing", "Frida Kahlo", "Nelson Mandela", "Ada Lovelace",
               "Leonardo da Vinci", "Serena Williams"],
}  # fmt: skip
TEMPLATES = [
    "Write a {style} {form} about {topic} for {audience}.",
    "Explain {concept} to {audience} in {count} sentences.",
    "Give me {count} practical tips for {activity} {context}.",
    "Classify the following {item} as {label} and justify your answer.",
    "Summarize the {doc} below in {count} bullet points, focusing on the {aspect}.",
    "Write a {lang} function that {task} and explain its time complexity.",
    "What are the main differences between {concept} and {concept}?",
    "Rewrite the following {doc} to sound more {tone} without changing its meaning.",
    "Generate a list of {count} {adj} names for a new {business}.",
    "Suggest a healthy dinner recipe that uses {ingredient} and {ingredient}.",
    "Describe how {concept} works, using an analogy that {audience} would understand.",
    "Create a {period} plan for someone who wants to {goal}.",
    "Compose an email to your manager asking {request}.",
    "Find the bug in this {lang} code that {task} and suggest a fix.",
    "Is it a good idea to discuss {topic} with {audience}? Explain why or why not.",
    "Write a {tone} reply to a {item} that complains about {topic}.",
    "List {count} common misconceptions about {concept} and correct each one.",
    "Pretend you are {audience} and describe {topic} in your own words.",
    "Plan a {period} trip to {city} for {audience} who loves {topic}.",
    "How would {person} have explained {concept}?",
    "Write an interview between {person} and {audience} about {topic}.",
    "Translate the {doc} into {lang} pseudocode.",
    "Draft a {tone} slogan for a {business} in {city}.",
    "Compare {topic} in {city} with {topic} in {city}.",
    "Why do people find {concept} confusing, and how can {audience} learn it?",
    "Design a quiz with {count} questions about {concept}.",
    "Tell me a {style} {form} where {person} discovers {topic}.",
    "Outline the pros and cons of {activity} {context}.",
    "Convert this {lang} snippet that {task} into {lang}.",
    "Recommend {count} books about {topic} for {audience}.",
    "Estimate how much it costs to open a {business} in {city}, step by step.",
    "Given a {item}, decide whether it is {label}.",
    "Make a shopping list for a week of meals built around {ingredient}.",
    "Write a {period} workout schedule for someone who wants to {goal} {context}.",
    "Critique the following {form} about {topic} and suggest improvements to its {aspect}.",
    "Answer as {person}: what advice would you give about {activity}?",
]
SYNONYMS = {
    "write": ["compose", "draft", "create"],
    "explain": ["describe", "clarify", "walk me through"],
    "give": ["provide", "share", "offer"],
    "tips": ["suggestions", "pieces of advice", "ideas"],
    "summarize": ["condense", "sum up", "give a summary of"],
    "main": ["key", "most important", "major"],
    "list": ["name", "enumerate", "write down"],
    "suggest": ["recommend", "propose", "come up with"],
    "describe": ["explain", "outline", "portray"],
    "short": ["brief", "quick"],
    "create": ["design", "make", "put together"],
    "about": ["on", "regarding", "concerning"],
    "someone": ["a person", "anyone", "somebody"],
    "how": ["in what way"],
    "new": ["fresh", "brand-new"],
}
FRAMES = [
    "{}",
    "{}",
    "Please {}",
    "Can you {}",
    "I need you to {}",
    "{} Keep it under 100 words.",
    "{} Use simple language.",
    "Task: {}",
    "{} Format the answer as a table.",
    "{} Include one concrete example.",
    "As a helpful assistant, {}",
    "{} Avoid jargon.",
]
# Optional extra requirements; with 36 templates x 24 clauses fresh fills overlap less.
CLAUSES = [
    "Mention {topic} at least once.",
    "Assume the reader is {audience}.",
    "Finish with a question about {concept}.",
    "Use no more than {count} paragraphs.",
    "Set it in {city}.",
    "Write it from the point of view of {person}.",
    "Keep the tone {tone}.",
    "Add a {adj} title.",
    "Explain any term related to {concept}.",
    "Make it suitable for {audience}.",
    "Include {count} examples.",
    "Avoid mentioning {topic}.",
    "Reference {person} somewhere.",
    "End with a {style} summary.",
    "Use {lang} for any code.",
    "It should take {period} to complete.",
    "Cite at least {count} sources.",
    "Compare it briefly with {concept}.",
    "Do not use bullet points.",
    "Answer in a single sentence.",
    "Think step by step.",
    "Number every step.",
    "Add a fun fact about {city}.",
    "Highlight the {aspect}.",
]
FILLERS = ["really", "also", "quickly", "carefully", "briefly", "clearly", "new", "simple"]


def fill(rng: random.Random) -> str:
    """A template in a frame, 0-2 extra clauses, slots drawn independently."""
    parts = [rng.choice(TEMPLATES)] + rng.sample(CLAUSES, rng.choice([0, 1, 1, 2]))
    return rng.choice(FRAMES).format(slots(rng, " ".join(parts)))


def slots(rng: random.Random, text: str) -> str:
    """Each ``{slot}`` of ``text`` replaced by a random value (a slot may repeat)."""
    while "{" in text:
        start, end = text.index("{"), text.index("}")
        name = text[start + 1 : end]
        value = topic(rng) if name == "topic" else rng.choice(SLOTS[name])
        text = text[:start] + value + text[end + 1 :]
    return text


def topic(rng: random.Random) -> str:
    return f"{rng.choice(TOPIC_ADJ)} {rng.choice(TOPIC_NOUN)}"


def paraphrase(rng: random.Random, text: str) -> str:
    """Swap some words for synonyms and wrap the sentence in a frame."""
    words = []
    for word in text.split():
        options = SYNONYMS.get(word.lower())
        words.append(rng.choice(options) if options and rng.random() < 0.6 else word)
    body = " ".join(words)
    return rng.choice(FRAMES).format(body[0].lower() + body[1:] if body else body)


def edit(rng: random.Random, text: str) -> str:
    """1-4 word substitutions, insertions or deletions: a near-duplicate."""
    words = text.split()
    for _ in range(rng.randint(1, 4)):
        op, i = rng.random(), rng.randrange(len(words))
        if op < 0.4:
            words[i] = rng.choice(FILLERS + rng.choice(list(SLOTS.values())))
        elif op < 0.7 or len(words) < 4:
            words.insert(i, rng.choice(FILLERS))
        else:
            del words[i]
    return " ".join(words)


def instruction(rng: random.Random, earlier: list[str], fresh: float) -> str:
    """One instruction of 8-25 words: fresh with probability ``fresh``, else a paraphrase or
    a near-duplicate (edit) of one of ``earlier``, half and half."""
    while True:
        roll = rng.random()
        if roll < fresh or not earlier:
            text = fill(rng)
        elif roll < (1 + fresh) / 2:
            text = paraphrase(rng, rng.choice(earlier))
        else:
            text = edit(rng, rng.choice(earlier))
        if 8 <= len(text.split()) <= 25:
            return text


def make_data(n_candidates: int, n_pool: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (pool, candidates).

    The pool stands for instructions accepted earlier, so it is all fresh fills; 40% of the
    candidates paraphrase or edit a pool item or an earlier candidate (as a model repeating
    itself does).
    """
    rng = random.Random(seed)
    pool = [instruction(rng, [], fresh=1.0) for _ in range(n_pool)]
    candidates: list[str] = []
    for _ in range(n_candidates):
        earlier = pool + candidates if rng.random() < 0.5 else pool
        candidates.append(instruction(rng, earlier, fresh=0.6))
    return pool, candidates


def pair_count(decisions: list[Decision], n_pool: int) -> int:
    """Pairs a naive pass scores: each candidate against the pool as it stands then."""
    pairs, size = 0, n_pool
    for accepted, _, _ in decisions:
        pairs += size
        size += accepted
    return pairs


def same_decisions(ours: list[Decision], naive: list[Decision]) -> bool:
    """Same accept/reject flags, and the same maximum score for every rejection."""
    return all(
        a == b and (a or sa == sb) for (a, sa, _), (b, sb, _) in zip(ours, naive, strict=True)
    )


def timed(fn, *args) -> tuple[list[Decision], float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5000)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--naive-sample", type=int, default=200)
    parser.add_argument("--full", action="store_true", help="run naive on every candidate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pool, candidates = make_data(args.candidates, args.pool, args.seed)
    lengths = [len(t.split()) for t in pool + candidates]
    print(
        f"pool {len(pool)}, candidates {len(candidates)}, "
        f"words {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.1f}), "
        f"threshold {args.threshold}"
    )

    ours, ours_s = timed(dedup, candidates, pool, args.threshold)
    n_naive = len(candidates) if args.full else min(args.naive_sample, len(candidates))
    naive, naive_s = timed(naive_dedup, candidates[:n_naive], pool, args.threshold)
    # Sequential decisions: the first N of a full run are those of a run on the first N.
    ours_head, ours_head_s = timed(dedup, candidates[:n_naive], pool, args.threshold)
    identical = same_decisions(ours[:n_naive], naive) and ours_head == ours[:n_naive]

    per_pair = naive_s / pair_count(naive, len(pool))
    naive_full_s = naive_s if args.full else per_pair * pair_count(ours, len(pool))
    rows = [
        ("ours (instruct.self_instruct.dedup)", len(candidates), ours_s, sum(d[0] for d in ours)),
        ("ours, first N only", n_naive, ours_head_s, sum(d[0] for d in ours_head)),
        ("naive (rouge-score)", n_naive, naive_s, sum(d[0] for d in naive)),
    ]
    if args.full:
        del rows[1]  # the same run as the first row
    print(f"\n{'method':<30}{'cands':>7}{'seconds':>10}{'cands/s':>10}{'accepted':>10}")
    for name, n, seconds, accepted in rows:
        print(f"{name:<30}{n:>7}{seconds:>10.2f}{n / seconds:>10.1f}{accepted:>10}")
    if not args.full:
        print(f"{'naive, projected to all':<30}{len(candidates):>7}{naive_full_s:>10.1f}")
    print(f"\nnaive per pair: {per_pair * 1e6:.1f} µs")
    if not args.full:
        print(f"speed-up, same first {n_naive} candidates: {naive_s / ours_head_s:.1f}x")
    label = "measured" if args.full else "projected naive"
    print(f"speed-up, all {len(candidates)} candidates ({label}): {naive_full_s / ours_s:.1f}x")
    print(f"identical decisions on the {n_naive} naive-checked candidates: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
