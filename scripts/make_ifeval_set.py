"""Build ``instruct/data/ifeval.jsonl``: our own instruction-following test set in IFEval's format.

IFEval (Zhou et al. 2023, arXiv:2311.07911) pairs base tasks with verifiable instructions and
scores a response with a checker per instruction. We build our set the same way, from base tasks
and instruction phrasings written for this project (none are taken from google/IFEval), so that
every record can be scored by lm-evaluation-harness's IFEval checkers unchanged.

Each output line is one JSON object, with keys in IFEval's order::

    {"key": 1001, "prompt": "...", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}

The set is a pure function of ``--seed`` and ``--count``: one ``random.Random(seed)`` drives every
choice, and nothing iterates a set or depends on hashing, so a run on any machine writes the same
bytes. Regenerate the shipped file with::

    python scripts/make_ifeval_set.py
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

Kwargs = dict[str, str | int | list[str]]
Record = dict[str, int | str | list[str] | list[Kwargs]]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "instruct" / "data" / "ifeval.jsonl"
DEFAULT_SEED = 0
DEFAULT_COUNT = 320
FIRST_KEY = 1001  # keys are consecutive from here
MULTI_SHARE = 0.3  # ~30% of prompts carry 2-3 instructions, as in IFEval's mix
TRIPLE_SHARE = 1 / 3  # of those multi-instruction prompts, a third carry three

# The 25 instruction ids lm-evaluation-harness registers (instructions_registry.INSTRUCTION_DICT),
# each with the kwargs its build_description takes, in the order get_instruction_args_keys
# lists them. Ids without arguments get {} in a record.
ALLOWED_KWARGS: dict[str, tuple[str, ...]] = {
    "keywords:existence": ("keywords",),
    "keywords:frequency": ("keyword", "frequency", "relation"),
    "keywords:forbidden_words": ("forbidden_words",),
    "keywords:letter_frequency": ("letter", "let_frequency", "let_relation"),
    "language:response_language": ("language",),
    "length_constraints:number_sentences": ("num_sentences", "relation"),
    "length_constraints:number_paragraphs": ("num_paragraphs",),
    "length_constraints:number_words": ("num_words", "relation"),
    "length_constraints:nth_paragraph_first_word": (
        "num_paragraphs",
        "nth_paragraph",
        "first_word",
    ),
    "detectable_content:number_placeholders": ("num_placeholders",),
    "detectable_content:postscript": ("postscript_marker",),
    "detectable_format:number_bullet_lists": ("num_bullets",),
    "detectable_format:constrained_response": (),
    "detectable_format:number_highlighted_sections": ("num_highlights",),
    "detectable_format:multiple_sections": ("section_spliter", "num_sections"),
    "detectable_format:json_format": (),
    "detectable_format:title": (),
    "combination:two_responses": (),
    "combination:repeat_prompt": ("prompt_to_repeat",),
    "startend:end_checker": ("end_phrase",),
    "change_case:capital_word_frequency": ("capital_frequency", "capital_relation"),
    "change_case:english_capital": (),
    "change_case:english_lowercase": (),
    "punctuation:no_comma": (),
    "startend:quotation": (),
}
INSTRUCTION_IDS: tuple[str, ...] = tuple(ALLOWED_KWARGS)

# --- Compatibility: which instructions may share a prompt -----------------------------------
# Stricter than lm-eval's INSTRUCTION_CONFLICTS (every pair it forbids, we forbid too), because
# we also drop pairs that are satisfiable only by accident of how a checker is written.

# Ids that combine with only these partners (and each other id with them only if listed).
ONLY_WITH: dict[str, tuple[str, ...]] = {
    # The whole response is one of three fixed sentences: nothing else can be checked.
    "detectable_format:constrained_response": (),
    # Text outside the JSON breaks json.loads; word-level bans and requirements still fit.
    "detectable_format:json_format": ("keywords:existence", "keywords:forbidden_words"),
    # The two answers are split on ******, which miscounts paragraphs, sections and endings.
    "combination:two_responses": (
        "keywords:existence",
        "keywords:forbidden_words",
        "language:response_language",
        "detectable_format:title",
        "punctuation:no_comma",
    ),
    # The repeated request is English and carries the prompt's own commas and casing.
    "combination:repeat_prompt": ("keywords:existence", "detectable_format:title"),
}

# Within a group, any two ids conflict.
CONFLICT_GROUPS: tuple[tuple[str, ...], ...] = (
    # Length limits interact (400 words in 3 sentences) and two paragraph separators disagree.
    (
        "length_constraints:number_sentences",
        "length_constraints:number_paragraphs",
        "length_constraints:number_words",
        "length_constraints:nth_paragraph_first_word",
    ),
    # All caps, all lowercase and a count of all-caps words contradict one another.
    (
        "change_case:english_capital",
        "change_case:english_lowercase",
        "change_case:capital_word_frequency",
    ),
)

# Further pairs that conflict, each for the reason given.
CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    # Section markers are English words; lm-eval forbids this pair too.
    ("language:response_language", "detectable_format:multiple_sections"),
    # Required or banned English words and phrases cannot be judged in another language.
    ("language:response_language", "keywords:existence"),
    ("language:response_language", "keywords:frequency"),
    ("language:response_language", "keywords:forbidden_words"),
    ("language:response_language", "startend:end_checker"),
    ("language:response_language", "length_constraints:nth_paragraph_first_word"),
    # Letters a-z and capitals do not exist in most of the scripts we ask for.
    ("language:response_language", "keywords:letter_frequency"),
    ("language:response_language", "change_case:capital_word_frequency"),
    ("language:response_language", "change_case:english_capital"),
    ("language:response_language", "change_case:english_lowercase"),
    # The sentence splitter only knows . ? ! as sentence ends.
    ("language:response_language", "length_constraints:number_sentences"),
    # Highlights inside sections: lm-eval forbids the pair.
    ("detectable_format:multiple_sections", "detectable_format:number_highlighted_sections"),
    # Sections and paragraphs would be two competing ways to split the text.
    ("detectable_format:multiple_sections", "length_constraints:number_paragraphs"),
    ("detectable_format:multiple_sections", "length_constraints:nth_paragraph_first_word"),
    # "Section 1" is matched case-sensitively; SECTION counts as an all-caps word.
    ("detectable_format:multiple_sections", "change_case:english_capital"),
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),
    ("detectable_format:multiple_sections", "change_case:capital_word_frequency"),
    # A title before the first paragraph would be read as its first word.
    ("detectable_format:title", "length_constraints:nth_paragraph_first_word"),
    # The title would sit outside the quotation marks; lm-eval forbids the pair.
    ("detectable_format:title", "startend:quotation"),
    # A postscript is an extra paragraph, and it competes with a fixed last phrase.
    ("detectable_content:postscript", "length_constraints:number_paragraphs"),
    ("detectable_content:postscript", "length_constraints:nth_paragraph_first_word"),
    ("detectable_content:postscript", "startend:end_checker"),
    # "P.S." and the fixed end phrases are written with capitals.
    ("detectable_content:postscript", "change_case:english_lowercase"),
    ("startend:end_checker", "change_case:english_lowercase"),
    ("startend:end_checker", "change_case:english_capital"),
    # Bullet lines inside ***-separated paragraphs make the paragraph count ambiguous.
    ("detectable_format:number_bullet_lists", "length_constraints:number_paragraphs"),
    ("detectable_format:number_bullet_lists", "length_constraints:nth_paragraph_first_word"),
)


def compatible(a: str, b: str) -> bool:
    """Whether instructions ``a`` and ``b`` may appear in the same prompt."""
    if a == b:
        return False
    if a in ONLY_WITH and b not in ONLY_WITH[a]:
        return False
    if b in ONLY_WITH and a not in ONLY_WITH[b]:
        return False
    if any(a in group and b in group for group in CONFLICT_GROUPS):
        return False
    return (a, b) not in CONFLICT_PAIRS and (b, a) not in CONFLICT_PAIRS


# --- Values the kwargs are drawn from -------------------------------------------------------

RELATIONS = ("less than", "at least")  # the two relations lm-eval's checkers accept

# ISO 639-1 codes from lm-eval's instructions_util.LANGUAGE_CODES, English left out because
# asking for English is no constraint on an English prompt.
LANGUAGES: dict[str, str] = {
    "es": "Spanish",
    "pt": "Portuguese",
    "ar": "Arabic",
    "hi": "Hindi",
    "fr": "French",
    "ru": "Russian",
    "de": "German",
    "ja": "Japanese",
    "it": "Italian",
    "bn": "Bengali",
    "uk": "Ukrainian",
    "th": "Thai",
    "ur": "Urdu",
    "ta": "Tamil",
    "te": "Telugu",
    "bg": "Bulgarian",
    "ko": "Korean",
    "pl": "Polish",
    "he": "Hebrew",
    "fa": "Persian",
    "vi": "Vietnamese",
    "ne": "Nepali",
    "sw": "Swahili",
    "kn": "Kannada",
    "mr": "Marathi",
    "gu": "Gujarati",
    "pa": "Punjabi",
    "ml": "Malayalam",
    "fi": "Finnish",
}

# Distinctive nouns: few English words contain them, so substring matching counts them fairly.
KEYWORDS = (
    "anchor", "balcony", "blueprint", "bicycle", "candle", "canvas", "compass", "copper",
    "curiosity", "dolphin", "falcon", "feather", "glacier", "granite", "harbour", "horizon",
    "jasmine", "kettle", "ladder", "lantern", "ledger", "marble", "meadow", "mirror", "nectar",
    "notebook", "oasis", "orchard", "patience", "pebble", "pepper", "quilt", "ribbon", "rocket",
    "saddle", "satellite", "telescope", "thunder", "tunnel", "umbrella", "velvet", "volcano",
    "willow", "compost", "lighthouse", "passport", "sunflower", "treasure", "whistle", "cinnamon",
)  # fmt: skip

# Filler words a fluent answer reaches for without thinking: banning them is a real constraint.
FORBIDDEN = (
    "very", "really", "just", "actually", "basically", "literally", "stuff", "thing", "things",
    "nice", "great", "good", "bad", "amazing", "awesome", "important", "simple", "easy", "many",
    "always", "definitely", "obviously", "totally", "huge", "lot", "quite", "pretty", "super",
    "incredible", "best", "crucial", "essential", "unique", "significant",
)  # fmt: skip

FIRST_WORDS = (
    "however", "finally", "today", "first", "meanwhile", "overall", "imagine", "still", "next",
    "sometimes", "honestly", "yesterday", "perhaps", "because", "luckily", "unfortunately",
    "interestingly", "eventually", "then", "clearly", "instead", "besides", "once", "now",
)  # fmt: skip

# No commas, so each fits beside punctuation:no_comma.
END_PHRASES = (
    "Let me know if you have further questions.",
    "Thanks for reading.",
    "That is all for now.",
    "Hope this helps!",
    "Until next time.",
    "Stay curious.",
    "Feel free to ask for more details.",
    "Have a wonderful day.",
    "Is there anything else I can help with?",
)

POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")  # the two markers lm-eval's checker has patterns for
SECTION_SPLITERS = ("Section", "SECTION")  # spelled as lm-eval spells the kwarg

LETTERS = "abcdefghijklmnopqrstuvwxyz"
RARE_LETTERS = "jqxzkvwy"  # "fewer than N" is only fair for letters that are easy to avoid

# --- Base tasks (written for this project) --------------------------------------------------

GENERAL_TASKS = (
    # explanations
    "Explain how a refrigerator keeps food cold.",
    "Explain why the sky looks red at sunset.",
    "Explain how vaccines train the immune system.",
    "Describe how a bill becomes a law in a parliamentary system.",
    "Explain what inflation is and why central banks try to control it.",
    "Explain how tides are caused by the moon and the sun.",
    "Explain the difference between weather and climate to a ten-year-old.",
    "Describe how bees tell each other where to find flowers.",
    "Explain how a compiler turns source code into a running program.",
    "Explain why bread dough rises.",
    "Explain how noise-cancelling headphones work.",
    "Describe the water cycle as if you were a single drop of rain.",
    "Explain how credit scores are calculated and why lenders use them.",
    "Explain what a black hole is and how astronomers detect one.",
    "Explain why leaves change colour in autumn.",
    "Explain the basic idea behind public-key cryptography.",
    "Explain the rules of cricket to someone who only knows baseball.",
    "Explain how a heat pump can warm a house in winter.",
    # essays
    "Write an essay on the role of public parks in city life.",
    "Write an essay about whether handwritten letters still have a place today.",
    "Write an essay on what makes a teacher memorable.",
    "Write an essay about the impact of streaming services on the music industry.",
    "Write an essay on the history and future of the bicycle in cities.",
    "Write an essay arguing for or against school uniforms.",
    "Write an essay about the value of boredom for creativity.",
    "Write an essay on how the printing press changed Europe.",
    "Write an essay about why people collect things.",
    "Write an essay on the pros and cons of living in a small village.",
    # stories
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Write a story about a robot that learns to bake bread.",
    "Write a story set on the last day of summer in a seaside town.",
    "Tell a story about two strangers stuck together in a broken elevator.",
    "Write a fairy tale about a fox who wants to become a tailor.",
    "Write a mystery story in which the missing object turns out to be a library book.",
    "Write a story about a grandmother teaching her grandson to fish.",
    "Write a science fiction story about the first farm on Mars.",
    "Write a story about a street musician who plays for one special listener.",
    "Write a ghost story that takes place in an empty train station.",
    "Write a children's story about a cloud that is afraid of heights.",
    "Write a story about a cartographer who discovers an island missing from every map.",
    # poems and songs
    "Write a poem about the first snowfall of the year.",
    "Write a poem about a city at night.",
    "Write a poem celebrating an old pair of boots.",
    "Write a poem about the sound of rain on a tin roof.",
    "Write a poem about a friendship that survived a long distance.",
    "Write a poem from the point of view of a houseplant.",
    "Write a poem about the smell of a bakery in the morning.",
    "Write a poem about waiting for a train.",
    "Write a song about moving to a new city.",
    "Write song lyrics for a lullaby sung by a lighthouse to passing ships.",
    # product descriptions
    "Write a product description for a solar-powered camping lamp.",
    "Write a product description for a reusable water bottle that tracks how much you drink.",
    "Write a product description for a handmade ceramic teapot.",
    "Write a product description for a pair of trail running shoes.",
    "Write a product description for a board game about building railways.",
    "Write a product description for noise-cancelling earbuds aimed at students.",
    "Write a product description for an ergonomic office chair.",
    "Write a product description for a subscription box of snacks from around the world.",
    # advice
    "Give advice to someone starting their first job after university.",
    "What advice would you give a person who wants to run their first marathon?",
    "Give advice on keeping houseplants alive in a dark apartment.",
    "Give tips for studying effectively before exams.",
    "Offer advice to a new manager who now leads a team of former peers.",
    "Give advice on how to save money on groceries.",
    "What should a first-time traveller to Japan know before the trip?",
    "Give advice to a teenager who wants to start a small online business.",
    "How can someone fall asleep faster without taking medication?",
    "Give advice on preparing for a job interview at a software company.",
    # comparisons
    "Compare electric cars and petrol cars for a family that drives mostly in the city.",
    "Compare reading on an e-reader with reading printed books.",
    "Compare learning the piano with learning the guitar.",
    "Compare renting an apartment alone with living in a shared house.",
    "Compare trains and planes for travelling between two European capitals.",
    "Compare cats and dogs as pets for someone who works long hours.",
    "Compare Python and JavaScript as a first programming language.",
    "Compare tea and coffee as morning drinks.",
    # lists of ideas
    "Suggest ideas for a rainy weekend with young children.",
    "Brainstorm names for a bakery that specialises in sourdough.",
    "Suggest ways a small town could attract more visitors.",
    "Come up with ideas for a science fair project about plants.",
    "Suggest themes for a neighbourhood street party.",
    "Brainstorm gift ideas for a friend who loves hiking.",
    "Suggest ways to make a long car journey fun for a family.",
    "List ideas for reducing plastic waste in an office.",
    "Suggest activities for a team-building day for a remote team.",
    "Come up with ideas for a podcast about local history.",
    # letters
    "Write a letter to a favourite author telling them how one of their books affected you.",
    "Write a letter from a parent to a child who is leaving home for university.",
    "Write an open letter to the people who will live in the year 2100.",
    "Write a letter from a lighthouse keeper to the ship captains who pass by every night.",
    # dialogues
    "Write a dialogue between a customer and a shop assistant about returning a faulty toaster.",
    "Write a dialogue between two astronauts on their first morning in space.",
    "Write a conversation between a chess coach and a nervous student before a tournament.",
    "Write a dialogue between a cat and a dog arguing about which of them is the better pet.",
    "Write a dialogue in which a grandparent describes the internet of the 1990s to a grandchild.",
    "Write a conversation between a detective and a witness who remembers suspiciously much.",
    # reviews
    "Write a review of a small Italian restaurant that recently opened in your neighbourhood.",
    "Write a review of an imaginary science fiction film about time travel.",
    "Write a review of a pair of wireless headphones you have used for a month.",
    "Write a review of a hotel with a beautiful view but slow service.",
    "Write a review of a museum dedicated to the history of toys.",
    "Write a review of a cooking class you attended.",
    # other writing
    "Write a speech for the opening of a new public library.",
    "Write a pitch for a mobile app that helps neighbours share tools.",
    "Describe a typical day in the life of a beekeeper.",
    "Write a biography of a fictional inventor who created a new kind of umbrella.",
    "Write a travel guide entry for a mountain village in winter.",
    "Describe your ideal home office.",
    "Write an introduction for a family recipe for lentil soup.",
    "Write a motivational message for a football team that just lost a final.",
    "Write a blog post about learning to play the violin as an adult.",
    "Write a news report about a town that woke up to find its river had turned green.",
    "Write a eulogy for a beloved family dog.",
    "Describe the perfect picnic.",
    "Write an advertisement for a music festival held on a farm.",
    "Write a pep talk for a student who failed a driving test.",
    "Write a movie plot outline about a chef who loses her sense of taste.",
    "Describe a city of the future that runs entirely on renewable energy.",
    "Write a tutorial on how to fix a flat bicycle tyre.",
    "Write a guide to brewing a proper pot of tea.",
    "Write a social media post announcing the launch of a community garden.",
    "Write a diary entry of a sailor on the first night of a long voyage.",
    "Describe the history of the humble pencil.",
    "Write a weather forecast for an imaginary planet with two suns.",
)

# Tasks whose natural answer has blanks to fill in, for detectable_content:number_placeholders.
FILL_IN_TASKS = (
    "Write a cover letter for a junior data analyst position at a logistics company.",
    "Draft an email inviting the neighbours on your street to a spring clean-up day.",
    "Write a letter to a landlord asking for a broken heater to be repaired.",
    "Draft a wedding invitation for a couple who are getting married in a lighthouse.",
    "Write an email to a professor asking whether there is room in a full seminar.",
    "Compose a notice for an office kitchen reminding staff to label their food.",
    "Write a reference letter for a former intern who worked in a bakery.",
    "Draft a press release announcing the opening of a community bike workshop.",
    "Write an out-of-office reply for a nurse who is going on holiday.",
    "Draft a letter of complaint to an airline about a lost suitcase.",
    "Write an email to a client explaining that a delivery will arrive late.",
    "Compose a thank-you note to a mentor who helped you change careers.",
    "Write a letter of resignation for a barista who is leaving on friendly terms.",
    "Draft a rental listing for a two-bedroom flat near a park.",
    "Write a birthday party invitation for a seven-year-old who loves dinosaurs.",
    "Draft an email asking a local newspaper to cover a school science fair.",
    "Write a donation request letter for an animal shelter that needs new kennels.",
    "Compose a welcome message for new members of an online chess club.",
    "Write an email with the agenda for a quarterly planning meeting.",
    "Draft a letter to a city council proposing more benches in the town square.",
    "Write an apology email from a restaurant to a customer who waited too long for a table.",
    "Draft a job posting for a part-time gardener at a botanical garden.",
    "Write a letter to your future self to be opened in ten years.",
    "Compose an email to a team announcing a new colleague and introducing her background.",
    "Draft a permission slip for a class trip to a science museum.",
    "Write a toast for the wedding of your oldest friend.",
)

# Passages to summarize, each written for this project.
PASSAGES = (
    "Cities are often several degrees warmer than the countryside around them. Asphalt and "
    "concrete soak up sunlight during the day and release it slowly at night, while tall "
    "buildings trap warm air and block breezes. Planners in several countries now paint roofs "
    "white, plant street trees and open small parks to cool their neighbourhoods. Early "
    "measurements suggest that a well-shaded street can feel up to ten degrees cooler on a "
    "summer afternoon.",
    "The common octopus has about five hundred million neurons, and roughly two thirds of them "
    "sit in its arms rather than in its central brain. Each arm can taste, touch and react to "
    "its surroundings on its own, which lets the animal search crevices for food while its eyes "
    "watch for predators. Researchers who study these animals say they challenge the idea that "
    "intelligence must be concentrated in a single organ.",
    "Long before commercial yeast was sold in packets, bakers kept a portion of fermented dough "
    "from each batch to start the next one. These starters were passed between neighbours and "
    "sometimes carried across oceans by migrants. Because every starter hosts its own mix of "
    "wild yeasts and bacteria, bread made in one town could taste noticeably different from "
    "bread made a few valleys away.",
    "When the public library in a small mining town lost half of its budget, its staff decided "
    "to lend more than books. They put sewing machines, soldering irons and a 3D printer in a "
    "back room and asked retired engineers to volunteer as teachers. Within two years visits "
    "had doubled, and teenagers who once avoided the building were booking time on the "
    "machines after school.",
    "During deep sleep, the brain replays patterns of activity that were recorded while a "
    "person was awake. Scientists believe this replay helps move new information from "
    "short-term storage into long-term memory. In experiments, students who slept after "
    "learning a list of words remembered more of them the next day than students who stayed "
    "awake for the same number of hours.",
    "The standard shipping container, introduced in the 1950s, looks like a plain steel box. "
    "Yet by letting goods move from ship to train to truck without being unpacked, it cut the "
    "cost of loading cargo dramatically. Ports that adopted containers grew quickly, while "
    "older harbours that relied on dock workers carrying sacks by hand declined. Many "
    "economists rank the container among the most influential inventions of its century.",
    "Every September, volunteers along a stretch of rocky coastline spend a weekend collecting "
    "litter washed up by winter storms. Last year they gathered more than two tonnes of "
    "rubbish, most of it fragments of fishing nets and plastic bottles. The organisers record "
    "each item in a shared database, and regional authorities have used their data to argue "
    "for stricter rules on discarded fishing gear.",
    "A software company with eighty employees tried a four-day working week for six months "
    "without cutting salaries. Managers expected output to fall, but the number of completed "
    "projects stayed roughly the same and sick days dropped by a third. Some staff said the "
    "shorter week forced them to cancel needless meetings, while others found it harder to "
    "reach clients on Fridays.",
    "In parts of the Sahel, farmers have revived an old technique of digging small half-moon "
    "shaped pits in hard, dry soil. The pits catch rainwater and organic matter, giving seeds a "
    "better chance to sprout. Combined with protecting the young trees that grow back from old "
    "roots, the method has restored vegetation on land that had been bare for decades.",
    "For most of the twentieth century, lighthouses were staffed by keepers who trimmed wicks, "
    "wound clockwork and logged the weather. Automation arrived gradually, first with electric "
    "lamps and later with remote monitoring, and by the end of the century almost every keeper "
    "had left. Today many former keepers' cottages are rented to holidaymakers, and a few "
    "lighthouses are looked after by volunteer societies.",
    "Chess engines once relied on rules written by human experts to judge a position. Newer "
    "engines instead learn by playing millions of games against themselves, adjusting a neural "
    "network after each one. Grandmasters who study their games say the engines favour bold "
    "pawn sacrifices and patient manoeuvres that older programs and most humans would reject.",
    "A village in the Alps installed a small hydroelectric turbine in the stream that runs "
    "past its church. The turbine produces enough electricity for about sixty homes, and the "
    "income from selling surplus power to the grid pays for the school bus. Residents voted "
    "on the project twice, and the second vote was held only after engineers showed that fish "
    "could still swim upstream past the intake.",
)

PASSAGE_LEADS = (
    "Summarize the following passage.",
    "Read the passage below and summarize it for a busy reader.",
    "Write a summary of this text for a school newsletter.",
    "Summarize the main points of the following article excerpt.",
)

# Yes/no questions for detectable_format:constrained_response.
YES_NO_QUESTIONS = (
    "Is it worth learning to cook if you live alone?",
    "Should children be allowed to own smartphones before the age of twelve?",
    "Is remote work better for productivity than working in an office?",
    "Would a four-day work week help small businesses?",
    "Is it safe to go swimming right after a large meal?",
    "Can a houseplant noticeably improve the air in a bedroom?",
    "Should cities ban cars from their historic centres?",
    "Is renting a home in your twenties wiser than buying one?",
    "Do video games help teenagers develop problem-solving skills?",
    "Should public libraries stay open around the clock?",
    "Is a paper map still useful now that phones have GPS?",
    "Would learning Latin help a student learn modern languages?",
    "Is it rude to check your phone during dinner with friends?",
    "Should homework be abolished in primary schools?",
    "Can a cat be trained to walk on a leash?",
    "Does drinking coffee in the afternoon harm your sleep?",
    "Is nuclear power a sensible part of a low-carbon energy mix?",
    "Should museums return artefacts to the countries they came from?",
    "Is handwriting still worth teaching in schools?",
    "Would you recommend a gap year before university?",
    "Can an adult become fluent in a new language within one year?",
    "Is paying off a student loan early better than investing the money?",
    "Should tipping in restaurants be replaced by higher menu prices?",
    "Is it wise to start a business with a close friend?",
)

CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_OPTIONS_TEXT = ", ".join(f'"{option}"' for option in CONSTRAINED_OPTIONS)

# --- How each instruction is worded: str.format templates over the kwargs ------------------
# Slots are the kwarg names (lists already joined and quoted, language codes as names); every
# kwarg value appears in the text so that the prompt states exactly what will be checked.

PHRASINGS: dict[str, tuple[str, ...]] = {
    "keywords:existence": (
        "Include the keywords {keywords} in your response.",
        "Make sure the words {keywords} appear somewhere in your answer.",
        "Your answer must mention {keywords}.",
        "Work the words {keywords} into your response.",
    ),
    "keywords:frequency": (
        "Use the word '{keyword}' {relation} {frequency} times in your response.",
        "The word '{keyword}' should appear {relation} {frequency} times in your answer.",
        "In your reply, write the word '{keyword}' {relation} {frequency} times.",
    ),
    "keywords:forbidden_words": (
        "Do not use the words {forbidden_words} anywhere in your response.",
        "Avoid the words {forbidden_words} in your answer.",
        "Your response must not contain the words {forbidden_words}.",
    ),
    "keywords:letter_frequency": (
        "In your response, the letter '{letter}' should appear {let_relation} {let_frequency} "
        "times.",
        "Make sure the letter '{letter}' occurs {let_relation} {let_frequency} times in your "
        "answer, counting upper and lower case together.",
        "Write your answer so that the letter '{letter}' is used {let_relation} {let_frequency} "
        "times.",
    ),
    "language:response_language": (
        "Your entire response must be in {language}; no other language is allowed.",
        "Write your whole answer in {language} and use no other language.",
        "Respond only in {language}, from the first word to the last.",
    ),
    "length_constraints:number_sentences": (
        "Your response should contain {relation} {num_sentences} sentences.",
        "Answer in {relation} {num_sentences} sentences.",
        "Use {relation} {num_sentences} sentences in your reply.",
    ),
    "length_constraints:number_paragraphs": (
        "Your response should have exactly {num_paragraphs} paragraphs, separated from each "
        "other by the markdown divider ***.",
        "Write {num_paragraphs} paragraphs and put the markdown divider *** between "
        "consecutive paragraphs.",
        "Split your answer into {num_paragraphs} paragraphs, with a line containing only *** "
        "between one paragraph and the next.",
    ),
    "length_constraints:number_words": (
        "Answer with {relation} {num_words} words.",
        "Your response should be {relation} {num_words} words long.",
        "Use {relation} {num_words} words in your response.",
    ),
    "length_constraints:nth_paragraph_first_word": (
        "Write exactly {num_paragraphs} paragraphs, separated from each other by one blank "
        "line (two new lines). Paragraph {nth_paragraph} must begin with the word "
        "'{first_word}'.",
        "Your response should have {num_paragraphs} paragraphs separated by blank lines, and "
        "paragraph number {nth_paragraph} has to start with the word '{first_word}'.",
        "Organize your answer into {num_paragraphs} paragraphs, using an empty line between "
        "paragraphs and nowhere else; start paragraph {nth_paragraph} with the word "
        "'{first_word}'.",
    ),
    "detectable_content:number_placeholders": (
        "Include at least {num_placeholders} placeholders written in square brackets, like "
        "[name] or [date].",
        "Leave at least {num_placeholders} blanks for the reader to fill in, each written as a "
        "placeholder in square brackets such as [company name].",
        "Use at least {num_placeholders} square-bracket placeholders (for example "
        "[phone number]) for details you do not know.",
    ),
    "detectable_content:postscript": (
        'At the end of your response, add a postscript that starts with "{postscript_marker}".',
        'Finish with a postscript beginning with "{postscript_marker}".',
        'After the main text, add a brief note that starts with "{postscript_marker}".',
    ),
    "detectable_format:number_bullet_lists": (
        "Your answer must contain exactly {num_bullets} bullet points, written as markdown "
        "bullets like:\n* First point\n* Second point",
        'Use exactly {num_bullets} markdown bullet points (lines starting with "* ") and no '
        "other bullets.",
        "Format the answer as a markdown list of exactly {num_bullets} bullet points, each line "
        "starting with an asterisk and a space.",
    ),
    "detectable_format:constrained_response": (
        f"Answer with exactly one of the following options: {_OPTIONS_TEXT}.",
        f"Reply with one of these phrases: {_OPTIONS_TEXT}.",
        f"Choose your reply from these options: {_OPTIONS_TEXT}.",
    ),
    "detectable_format:number_highlighted_sections": (
        "Highlight at least {num_highlights} parts of your answer with markdown, for example "
        "*an important phrase*.",
        "Mark at least {num_highlights} sections of your response as highlighted by wrapping "
        "them in single asterisks, like *this highlighted part*.",
        "Emphasize at least {num_highlights} key passages by wrapping each in asterisks, "
        "e.g. *key passage*.",
    ),
    "detectable_format:multiple_sections": (
        "Divide your response into {num_sections} sections. Begin each section with its label, "
        "for example:\n{section_spliter} 1\n[first section]\n{section_spliter} 2\n"
        "[second section]",
        "Organize your answer into {num_sections} parts, each starting with a line of the form "
        "'{section_spliter} X', where X is the part number (e.g. '{section_spliter} 1').",
        "Your response must have {num_sections} sections, and each section must begin with "
        "the marker {section_spliter} followed by its number, like {section_spliter} 1.",
    ),
    "detectable_format:json_format": (
        "Format your entire output as valid JSON. You may wrap it in markdown code fences (```).",
        "Your whole response must be a JSON object; put nothing outside the JSON.",
        "Return the answer as JSON only, with no text before or after it.",
    ),
    "detectable_format:title": (
        "Give your response a title wrapped in double angular brackets, such as <<morning light>>.",
        "Start with a title enclosed in double angle brackets, for example <<a quiet harbour>>.",
        "Your answer must include a title inside double angular brackets, like <<title here>>.",
    ),
    "combination:two_responses": (
        "Give two different responses, separated by six asterisks: ******. Put nothing else "
        "between them.",
        "Write two distinct answers and separate them with six asterisks (******); use the "
        "asterisks nowhere else.",
        "Provide two alternative responses, separated by exactly six asterisk symbols "
        "(******) and nothing more.",
    ),
    # Always the prompt's last sentence: prompt_to_repeat is everything before it.
    "combination:repeat_prompt": (
        "Before you answer, repeat the request above word for word, changing nothing and "
        "writing nothing before it (this sentence is not part of the request); then give your "
        "answer.",
        "First copy out my request exactly as written, leaving out this sentence and putting "
        "nothing in front of it; after that, answer it.",
        "Begin your reply by restating everything before this sentence verbatim, with no words "
        "or characters ahead of it, and then respond to it.",
    ),
    "startend:end_checker": (
        'Finish your response with the exact phrase "{end_phrase}" No other words should '
        "follow it.",
        'End your answer with these exact words: "{end_phrase}" Nothing may come after them.',
        'The very last words of your response must be "{end_phrase}" with nothing after that.',
    ),
    "change_case:capital_word_frequency": (
        "In your response, words written in all capital letters should appear {capital_relation} "
        "{capital_frequency} times.",
        "Use fully capitalized words (like IMPORTANT) {capital_relation} {capital_frequency} "
        "times in your answer.",
        "Your answer should contain {capital_relation} {capital_frequency} words written "
        "entirely in capital letters.",
    ),
    "change_case:english_capital": (
        "Your entire response should be in English and in capital letters only.",
        "Write your whole answer in English using only uppercase letters.",
        "Respond in English, with every letter capitalized.",
    ),
    "change_case:english_lowercase": (
        "Your entire response should be in English and in lowercase letters only; no capital "
        "letters are allowed.",
        "Write your whole answer in English using only lowercase letters, with no capitals "
        "anywhere.",
        "Respond in English and keep every single letter lowercase.",
    ),
    "punctuation:no_comma": (
        "Do not use any commas in your response.",
        "Write your answer without a single comma.",
        "Avoid commas entirely in your reply.",
    ),
    "startend:quotation": (
        "Wrap your entire response in double quotation marks.",
        "Put your whole answer inside one pair of double quotes.",
        "Enclose the complete response in double quotation marks, from the first character to "
        "the last.",
    ),
}

# Ids whose kwargs draw on words the other instructions require, so they are drawn last.
_DRAWN_LAST = ("keywords:forbidden_words", "keywords:letter_frequency")


def _pick_words(rng: random.Random, pool: Sequence[str], n: int, taken: list[str]) -> list[str]:
    """``n`` distinct words from ``pool`` that occur in none of the ``taken`` texts, sorted."""
    free = [w for w in pool if not any(re.search(rf"\b{w}\b", t) for t in taken)]
    return sorted(rng.sample(free, n))


def draw_kwargs(rng: random.Random, instruction_id: str, taken: list[str]) -> Kwargs:
    """Draw valid kwargs for ``instruction_id``.

    ``taken`` holds the lowercased words and phrases other instructions of the same prompt
    already require; banned words and rare letters are chosen to avoid them, so that no two
    instructions of one prompt contradict each other. repeat_prompt's kwarg is filled in once
    the prompt is assembled.
    """
    match instruction_id:
        case "keywords:existence":
            return {"keywords": _pick_words(rng, KEYWORDS, rng.choice((2, 2, 3)), taken)}
        case "keywords:frequency":
            relation = rng.choice(RELATIONS)
            # "less than 2" still allows one use; "at least 5" fits a few paragraphs.
            frequency = rng.randint(2, 4) if relation == "less than" else rng.randint(2, 5)
            keyword = _pick_words(rng, KEYWORDS, 1, taken)[0]
            return {"keyword": keyword, "frequency": frequency, "relation": relation}
        case "keywords:forbidden_words":
            return {"forbidden_words": _pick_words(rng, FORBIDDEN, rng.choice((2, 3)), taken)}
        case "keywords:letter_frequency":
            relation = rng.choice(RELATIONS)
            free = [c for c in RARE_LETTERS if not any(c in t for t in taken)]
            if relation == "less than" and free:
                letter, frequency = rng.choice(free), rng.randint(2, 6)
            else:
                relation, letter = "at least", rng.choice(LETTERS)
                # A dozen e's come in any paragraph; a dozen q's would force odd words.
                frequency = rng.randint(2, 5) if letter in RARE_LETTERS else rng.randint(3, 12)
            return {"letter": letter, "let_frequency": frequency, "let_relation": relation}
        case "language:response_language":
            return {"language": rng.choice(list(LANGUAGES))}
        case "length_constraints:number_sentences":
            relation = rng.choice(RELATIONS)
            # lm-eval draws 1-20; "less than 2" would leave a one-sentence answer, so start at 3.
            low, high = (3, 10) if relation == "less than" else (3, 15)
            return {"num_sentences": rng.randint(low, high), "relation": relation}
        case "length_constraints:number_paragraphs":
            return {"num_paragraphs": rng.randint(2, 5)}
        case "length_constraints:number_words":
            relation = rng.choice(RELATIONS)
            # lm-eval draws 100-500; short caps make sense too, so "less than" goes down to 50.
            low, high = (50, 300) if relation == "less than" else (100, 500)
            return {"num_words": rng.randrange(low, high + 1, 10), "relation": relation}
        case "length_constraints:nth_paragraph_first_word":
            num_paragraphs = rng.randint(2, 5)
            return {
                "num_paragraphs": num_paragraphs,
                "nth_paragraph": rng.randint(1, num_paragraphs),
                "first_word": _pick_words(rng, FIRST_WORDS, 1, taken)[0],
            }
        case "detectable_content:number_placeholders":
            return {"num_placeholders": rng.randint(2, 5)}
        case "detectable_content:postscript":
            return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
        case "detectable_format:number_bullet_lists":
            return {"num_bullets": rng.randint(2, 6)}
        case "detectable_format:number_highlighted_sections":
            return {"num_highlights": rng.randint(2, 5)}
        case "detectable_format:multiple_sections":
            return {
                "section_spliter": rng.choice(SECTION_SPLITERS),
                "num_sections": rng.randint(2, 5),
            }
        case "startend:end_checker":
            return {"end_phrase": rng.choice(END_PHRASES)}
        case "change_case:capital_word_frequency":
            relation = rng.choice(RELATIONS)
            # nltk counts "I" and "P.S." as all-caps words, so a cap starts at 3, not 1.
            frequency = rng.randint(3, 8) if relation == "less than" else rng.randint(2, 12)
            return {"capital_frequency": frequency, "capital_relation": relation}
        case _:
            return {}


def _required_texts(kwargs: Kwargs) -> list[str]:
    """The lowercased words and phrases ``kwargs`` make a response contain."""
    texts: list[str] = []
    for name in ("keywords", "keyword", "first_word", "end_phrase", "postscript_marker"):
        value = kwargs.get(name)
        if isinstance(value, list):
            texts.extend(v.lower() for v in value)
        elif isinstance(value, str):
            texts.append(value.lower())
    return texts


def _join_quoted(words: Sequence[str], conjunction: str) -> str:
    """``'a' and 'b'`` / ``'a', 'b' or 'c'``."""
    quoted = [f"'{w}'" for w in words]
    if len(quoted) == 1:
        return quoted[0]
    return f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


def describe(rng: random.Random, instruction_id: str, kwargs: Kwargs) -> str:
    """One phrasing of ``instruction_id``, with every kwarg value written into it."""
    slots: dict[str, str | int] = {}
    for name, value in kwargs.items():
        if isinstance(value, list):  # keywords: all required; forbidden_words: none allowed
            slots[name] = _join_quoted(value, "or" if name == "forbidden_words" else "and")
        elif name == "language":
            slots[name] = LANGUAGES[value]
        else:
            slots[name] = value
    return rng.choice(PHRASINGS[instruction_id]).format(**slots)


def assemble(task: str, descriptions: Sequence[str]) -> str:
    """The task followed by its instructions; multi-line parts are set off by blank lines."""
    if not descriptions:
        return task
    multiline = any("\n" in d for d in descriptions)
    body = ("\n" if multiline else " ").join(descriptions)
    separator = "\n\n" if multiline or "\n" in task else " "
    return task + separator + body


def _least_used(rng: random.Random, candidates: Sequence[str], usage: dict[str, int]) -> str:
    """A random candidate among those used least so far (within one), to spread ids evenly."""
    low = min(usage[c] for c in candidates)
    return rng.choice([c for c in candidates if usage[c] <= low + 1])


def plan_instructions(rng: random.Random, count: int) -> list[tuple[str, ...]]:
    """The instruction ids of ``count`` prompts: ~70% one id, the rest two or three compatible.

    Multi-instruction prompts are planned first, then single ones top up whichever ids are
    used least, so every id ends up with about the same number of prompts.
    """
    usage = dict.fromkeys(INSTRUCTION_IDS, 0)
    combinable = [a for a in INSTRUCTION_IDS if any(compatible(a, b) for b in INSTRUCTION_IDS)]
    n_multi = round(count * MULTI_SHARE)
    n_triple = round(n_multi * TRIPLE_SHARE)
    plans: list[tuple[str, ...]] = []
    for size in [3] * n_triple + [2] * (n_multi - n_triple):
        chosen = [_least_used(rng, combinable, usage)]
        while len(chosen) < size:
            fits = [b for b in INSTRUCTION_IDS if all(compatible(a, b) for a in chosen)]
            if not fits:
                break  # no third id fits beside this pair: keep it a pair
            chosen.append(_least_used(rng, fits, usage))
        rng.shuffle(chosen)
        if "combination:repeat_prompt" in chosen:  # the request to repeat comes first
            chosen.remove("combination:repeat_prompt")
            chosen.append("combination:repeat_prompt")
        plans.append(tuple(chosen))
        for a in chosen:
            usage[a] += 1
    while len(plans) < count:
        single = _least_used(rng, INSTRUCTION_IDS, usage)
        plans.append((single,))
        usage[single] += 1
    rng.shuffle(plans)
    return plans


class _Deck:
    """Deals items in shuffled rounds, so every base task is used before any is used twice."""

    def __init__(self, rng: random.Random, items: Sequence[str]) -> None:
        self._rng = rng
        self._items = list(items)
        self._left: list[str] = []

    def deal(self) -> str:
        if not self._left:
            self._left = list(self._items)
            self._rng.shuffle(self._left)
        return self._left.pop()


def base_tasks() -> list[str]:
    """Every general base task: free-standing tasks, fill-in tasks and passage summaries."""
    summaries = [
        f"{PASSAGE_LEADS[i % len(PASSAGE_LEADS)]}\n\n{passage}"
        for i, passage in enumerate(PASSAGES)
    ]
    return [*GENERAL_TASKS, *FILL_IN_TASKS, *summaries]


def make_prompt(rng: random.Random, task: str, plan: Sequence[str]) -> tuple[str, list[Kwargs]]:
    """The prompt for ``task`` with the instructions ``plan``, and one kwargs dict per id."""
    drawn: dict[str, Kwargs] = {}
    taken: list[str] = []
    order = [a for a in plan if a not in _DRAWN_LAST] + [a for a in plan if a in _DRAWN_LAST]
    for instruction_id in order:
        drawn[instruction_id] = draw_kwargs(rng, instruction_id, taken)
        taken.extend(_required_texts(drawn[instruction_id]))
    descriptions = [describe(rng, a, drawn[a]) for a in plan if a != "combination:repeat_prompt"]
    prompt = assemble(task, descriptions)
    if "combination:repeat_prompt" in plan:
        # lm-eval checks that the response starts with prompt_to_repeat: it must be exactly the
        # text before the repeat sentence, which plan_instructions puts last.
        drawn["combination:repeat_prompt"] = {"prompt_to_repeat": prompt}
        separator = "\n\n" if "\n" in prompt else " "
        prompt += separator + describe(rng, "combination:repeat_prompt", {})
    return prompt, [drawn[a] for a in plan]


def build(seed: int = DEFAULT_SEED, count: int = DEFAULT_COUNT) -> list[Record]:
    """``count`` IFEval records, keys from :data:`FIRST_KEY`, fully determined by ``seed``."""
    rng = random.Random(seed)
    decks = {
        "general": _Deck(rng, base_tasks()),
        "fill_in": _Deck(rng, FILL_IN_TASKS),
        "yes_no": _Deck(rng, YES_NO_QUESTIONS),
    }
    records: list[Record] = []
    seen: set[str] = set()  # membership only; never iterated
    for index, plan in enumerate(plan_instructions(rng, count)):
        if "detectable_format:constrained_response" in plan:
            deck = decks["yes_no"]
        elif "detectable_content:number_placeholders" in plan:
            deck = decks["fill_in"]
        else:
            deck = decks["general"]
        for _ in range(100):  # a duplicate needs the same task, phrasing and values: rare
            prompt, kwargs = make_prompt(rng, deck.deal(), plan)
            if prompt not in seen:
                break
        else:
            raise RuntimeError(f"could not find a new prompt for {plan}; lower --count")
        seen.add(prompt)
        records.append(
            {
                "key": FIRST_KEY + index,
                "prompt": prompt,
                "instruction_id_list": list(plan),
                "kwargs": kwargs,
            }
        )
    return records


def write(records: Sequence[Record], path: Path) -> None:
    """Write ``records`` as JSONL: UTF-8, ``\\n`` line ends, keys in IFEval's order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python scripts/make_ifeval_set.py [--out PATH] [--seed N] [--count N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of prompts")
    args = parser.parse_args(argv)
    records = build(args.seed, args.count)
    write(records, args.out)
    print(f"wrote {len(records)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
