"""A broad, offline prompt set for training a static draft model (speculator) by self-distillation.

The target model answers these prompts; an EAGLE-style draft head is trained on its responses and evaluated on a
held-out split. The prompts therefore imitate what people send a small chat model: everyday questions, writing
tasks, explanations, puzzles, arithmetic, code in six languages, JSON and tool calls. Nothing is downloaded; every
prompt is written here, either by hand or from a template and word lists written here.

API
---
``BROAD_CATEGORIES``
    The category names, in a fixed order.
``broad_prompts(seed=0)``
    A list of dicts ``{"id", "category", "group", "prompt"}`` (plus ``"system"`` for some tool-call prompts).
    Hand-written prompts come first in each category; templated ones follow. ``seed`` only changes which filler
    combinations and numbers the templates draw (hand-written prompts and template structure stay the same); the
    same seed always gives the same list. ``id`` is ``"<category>-<group>-<crc32 of the text>"``.
``split_prompts(prompts, held_out_fraction=0.1, seed=0)``
    A deterministic train / held-out split, stratified by category and made **by group**.

Groups
------
Every hand-written prompt is its own group (``"<category>/h<nnn>"``). All prompts made from one template share a
group (``"<category>/<template name>"``), whatever fillers they received, so a held-out prompt is never a
training prompt with a different filler word. For tool calls a group is one tool: every request that uses the same
tool description (in whichever of the three prompt layouts) is in the same group, so held-out tools are unseen.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BROAD_CATEGORIES", "broad_prompts", "split_prompts", "normalize_prompt"]

BROAD_CATEGORIES: tuple[str, ...] = (
    "chat",
    "writing",
    "knowledge",
    "reasoning",
    "arithmetic",
    "code_python",
    "code_javascript",
    "code_c",
    "code_rust",
    "code_sql",
    "code_bash",
    "json",
    "tool_calls",
)

# One entry before ids are assigned: (group name inside the category, user prompt, optional system prompt).
_Entry = tuple[str, str, str | None]
_Hand = Sequence[str | tuple[str, str]]  # a hand-written prompt, or (system, prompt)


def normalize_prompt(text: str) -> str:
    """Lower-case ``text`` and collapse runs of whitespace (used to check that prompts are unique)."""
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------------------

_CHAT: list[str] = [
    "What's a good way to start running if I've never exercised before?",
    "I have trouble falling asleep at night. Any tips?",
    "How do I politely decline a wedding invitation from a coworker?",
    "What are some cheap hobbies I can pick up this winter?",
    "My houseplant's leaves are turning yellow. What could be wrong?",
    "Can you suggest a weekly meal plan for a vegetarian on a budget?",
    "How should I prepare for my first job interview?",
    "What's the best way to learn a new language as an adult?",
    "I'm moving to a new city and don't know anyone. How can I make friends?",
    "How often should I change my car's oil?",
    "Give me some ideas for a tenth wedding anniversary gift.",
    "Is it better to rent or buy a home? What should I consider?",
    "How do I get my toddler to eat more vegetables?",
    "I spilled water on my laptop keyboard. What should I do right now?",
    "How can I stop procrastinating when I work from home?",
    "Hi! How are you today?",
    "Can you recommend a few classic novels for someone who doesn't read much?",
    "I want to save money for a trip next summer. How do I make a simple budget?",
    "How do I clean a cast iron pan without ruining it?",
    "What are some good questions to ask on a first date?",
    "My cat keeps scratching the sofa. How can I stop her?",
    "How much water should I drink in a day?",
    "What's the difference between a latte and a cappuccino?",
    "I feel nervous before giving presentations. What can help?",
    "Plan a relaxing Sunday for me in a small town.",
    "What should I look for when buying a used bike?",
    "How do I remove a red wine stain from a carpet?",
    "Thanks for your help yesterday! Can you remind me how to boil an egg so the yolk stays soft?",
    "What are some fun things to do on a rainy day with kids aged 6 and 9?",
    "Should I tip at a coffee shop? What's normal?",
    "I just adopted a puppy. What do I need to buy first?",
    "What are easy ways to reduce plastic waste at home?",
    "My friend is going through a hard time after a breakup. How can I support her?",
    (
        "I've been offered two jobs. One pays 15% more but has a 90-minute commute each way; the other is a "
        "10-minute walk from my flat and the team seemed friendlier. I have a young child. Which should I pick, "
        "and what questions should I ask myself before deciding?"
    ),
    "What's a good stretching routine for someone who sits at a desk all day?",
    "How do I keep basil alive on a windowsill?",
    "Can you help me come up with a name for my bakery? It's small, cosy and known for cinnamon buns.",
    "What's the etiquette for leaving a group chat I was added to by mistake?",
    "ok so my sourdough starter smells like nail polish remover?? is it dead",
    "Is it rude to wear headphones in an open-plan office?",
    (
        "My sister and I are planning a surprise 60th birthday party for our dad. He doesn't like big crowds and "
        "loves fishing and old jazz records. Budget is around $400. Any ideas for the venue, food and activities?"
    ),
    "What are signs that I might be burning out at work?",
]

_CHAT_ACTIVITIES = [
    "gardening",
    "rock climbing",
    "baking bread",
    "street photography",
    "playing chess",
    "knitting",
    "swimming laps",
    "birdwatching",
    "cycling to work",
    "meditation",
]
_CHAT_CITIES = ["Lisbon", "Kyoto", "Mexico City", "Edinburgh", "Cape Town", "Vancouver", "Istanbul", "Hanoi"]
_CHAT_TALKS = [
    ("splitting household chores more fairly", "partner"),
    ("the noise they make late at night", "roommate"),
    ("getting a raise", "manager"),
    ("how much time they spend on their phone", "teenage son"),
    ("moving into assisted living", "elderly parents"),
    ("the money they borrowed months ago", "best friend"),
]


def _chat(rng: random.Random) -> list[_Entry]:
    out = _hand(_CHAT)
    out += [("t-beginner", f"What are some tips for {a} as a beginner?", None) for a in _CHAT_ACTIVITIES]
    for city in _CHAT_CITIES:
        days = rng.choice(["two", "three", "four", "five"])
        who = rng.choice(["", " with my partner", " on my own", " with two kids"])
        out.append(("t-visit", f"I'm visiting {city} for {days} days{who}. What should I see and eat?", None))
    for topic, rel in _CHAT_TALKS:
        out.append(("t-talk", f"How can I bring up {topic} with my {rel} without starting an argument?", None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------

_WRITING: list[str] = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a haiku about a city waking up.",
    "Draft an email to my landlord asking him to fix a leaking kitchen tap.",
    "Write a limerick about a cat who loves cheese.",
    'Rewrite this sentence to sound more formal: "Hey, can u send me the report by tmrw? thx"',
    "Write a product description for a reusable water bottle made of bamboo.",
    "Write the opening paragraph of a cover letter for a junior data analyst position.",
    "Compose a four-line birthday poem for my grandmother, who loves gardening.",
    "Write a two-paragraph opening for a mystery novel set on a night train.",
    'Fix the grammar in this text: "Me and him goes to the store yesterday and buyed three apple."',
    "Write a thank-you note to a teacher at the end of the school year.",
    (
        "Turn these notes into a short, friendly paragraph for our newsletter:\n"
        "- bake sale raised $1,240\n- thanks to 30 volunteers\n- money goes to new library books\n"
        "- next event: spring fair, April 12"
    ),
    "Write a dialogue between a robot and a child who meet in a park.",
    "Write a toast for my brother's wedding. Keep it under 150 words and a little funny.",
    "Write a sonnet about the passage of time.",
    (
        'Rewrite the following for a 7-year-old reader:\n\n"Volcanoes form where molten rock from beneath the '
        "Earth's crust rises to the surface. Pressure builds up until the magma erupts as lava, ash and gas.\""
    ),
    "Write a tweet announcing the opening of a new community library.",
    "Write an apology email to a customer whose order arrived two weeks late.",
    (
        "Summarise the key decisions in this meeting transcript:\n\n"
        "ANNA: We can't ship on the 3rd, QA found two blocking bugs.\n"
        "RAJ: Then let's move the release to the 10th and tell marketing today.\n"
        "ANNA: Agreed. I'll also drop the dark-mode feature from this release.\n"
        "LUIS: Fine by me. I'll update the roadmap and email the customers who asked for it."
    ),
    "Write a fable with a moral about patience, featuring a tortoise and a crow.",
    "Write a LinkedIn post celebrating my team's product launch.",
    "Give me three alternative titles for a blog post about minimalist living.",
    "Write a short horror story in exactly five sentences.",
    "Write a persuasive paragraph arguing that schools should start later in the morning.",
    (
        'Make this sentence more concise: "Due to the fact that we were running behind schedule, we made the '
        'decision to postpone the meeting until a later date."'
    ),
    "Write a warm, personal introduction for my family's lasagna recipe.",
    "Write a free-verse poem about the smell of rain.",
    "Write a letter from a soldier in 1916 to his sister back home.",
    'Paraphrase the proverb "The early bird catches the worm" in three different ways.',
    (
        "Write a short bio for a conference speaker: Dr. Amina Yusuf, marine biologist, studies coral reef "
        "recovery, 12 years of field work in the Red Sea."
    ),
    "Write a bedtime story about a little cloud who is afraid of thunder.",
    (
        'Rewrite this message so it sounds calm instead of angry, keeping the content: "I have called three times '
        'and NOBODY has fixed my internet. This is ridiculous."'
    ),
    "Write the opening scene of a screenplay in which two old friends meet at a funeral.",
    "Write a motivational speech for a high school football team that is losing at half-time.",
]

_WRITING_FORMS = ["haiku", "limerick", "short rhyming poem", "free-verse poem", "sonnet"]
_WRITING_SUBJECTS = [
    "a forgotten umbrella",
    "the first snow of winter",
    "a busy train station",
    "an old dog sleeping in the sun",
    "a thunderstorm over the hills",
    "learning to ride a bike",
    "a cup of morning coffee",
    "the last day of summer",
    "a lost sock",
    "the moon over the ocean",
]
_WRITING_EMAILS = [
    ("my manager", "asking for next Friday off"),
    ("a client", "explaining that the project will be a week late"),
    ("my child's teacher", "to arrange a meeting about homework"),
    ("a recruiter", "turning down a job offer"),
    ("the city council", "complaining about a broken streetlight"),
    ("a colleague", "thanking them for covering my shift"),
    ("a supplier", "requesting a refund for damaged goods"),
    ("my neighbours", "inviting them to a garden party"),
]
_WRITING_PREMISES = [
    "a robot who wants to learn to paint",
    "a girl who discovers her grandfather's secret map",
    "the last bookshop in a big city",
    "a dragon who is afraid of fire",
    "two strangers stuck in a lift",
    "a village where it never stops raining",
    "a time traveller who can only go back ten minutes",
    "a detective who solves crimes by smell",
]
_WRITING_PASSAGES = [
    "The city council voted on Tuesday to convert two downtown streets into pedestrian-only zones starting next "
    "spring. Supporters argue the change will boost local shops and reduce air pollution, while some business "
    "owners worry that customers who drive will go elsewhere. A one-year trial will be evaluated before the change "
    "becomes permanent.",
    "Researchers in Denmark found that people who took a 20-minute walk after lunch had lower blood sugar in the "
    "afternoon than those who sat still. The study followed 120 adults over six weeks. The authors say short walks "
    "may be an easy habit for people at risk of type 2 diabetes, but larger studies are needed.",
    "Our quarterly results show revenue up 8% compared with last year, driven mainly by strong sales of the new "
    "subscription plan. Costs rose faster than expected because of higher shipping prices, so profit was flat. Next "
    "quarter we will focus on renegotiating logistics contracts and expanding into two new markets.",
    "Honeybees communicate the location of flowers through a 'waggle dance'. The angle of the dance relative to "
    "vertical tells other bees the direction of the food compared with the sun, and the length of the waggle run "
    "indicates the distance. Karl von Frisch decoded this system and shared a Nobel Prize for it in 1973.",
    "Dear residents, please note that the water supply to Blocks A and B will be shut off on Thursday between "
    "9 a.m. and 1 p.m. for pipe maintenance. We recommend storing some water in advance. We apologise for the "
    "inconvenience and thank you for your patience.",
    "The novel follows Mara, a young engineer who returns to her coastal hometown after her father's death. Sorting "
    "through his workshop, she finds unfinished plans for a tidal power station, and the town's fierce debate over "
    "the project forces her to choose between her career in the city and the community that raised her.",
]
_WRITING_INSTRUCTIONS = [
    "Summarise the following text in two sentences.",
    "Rewrite the following text in a casual, chatty tone.",
    "Give this text a headline and a one-line summary.",
    "Turn the following text into three bullet points.",
    "What is the main point of this text, and who is it written for?",
]


def _writing(rng: random.Random) -> list[_Entry]:
    out = _hand(_WRITING)
    combos = [(f, s) for f in _WRITING_FORMS for s in _WRITING_SUBJECTS]
    for form, subject in rng.sample(combos, 10):
        out.append(("t-form", f"Write a {form} about {subject}.", None))
    for recipient, purpose in _WRITING_EMAILS:
        tone = rng.choice(["polite", "friendly", "firm but respectful", "brief and professional"])
        out.append(("t-email", f"Write a {tone} email to {recipient} {purpose}.", None))
    for premise in _WRITING_PREMISES:
        audience = rng.choice(["young children", "teenagers", "adults"])
        out.append(("t-story", f"Write a short story for {audience} about {premise}.", None))
    instructions = rng.sample(_WRITING_INSTRUCTIONS, len(_WRITING_INSTRUCTIONS))
    for i, passage in enumerate(_WRITING_PASSAGES):
        out.append(("t-passage", f"{instructions[i % len(instructions)]}\n\n{passage}", None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# knowledge
# ---------------------------------------------------------------------------------------------------------------

_KNOWLEDGE: list[str] = [
    "How does a refrigerator keep food cold?",
    "Why is the sky blue?",
    "Explain how the Roman Republic turned into an empire.",
    "What is the greenhouse effect, and how is it related to climate change?",
    "How do airplanes stay in the air?",
    "Explain what DNA is and how it stores information.",
    "Why was the invention of the printing press so important?",
    "How does the internet route a message from my computer to a website?",
    "Explain what a black hole is in a few paragraphs.",
    "What is inflation, and why do central banks raise interest rates to fight it?",
    "What is herd immunity and why does it matter?",
    "Describe the water cycle.",
    "Why did the Berlin Wall fall in 1989?",
    "How does public-key cryptography let two strangers communicate securely?",
    "What are tectonic plates, and how do they cause earthquakes?",
    "Explain the difference between a virus and a bacterium.",
    "What is machine learning? Give a simple example.",
    "Who was Ada Lovelace and why is she remembered?",
    "How does the European Union make laws?",
    "Explain how GPS determines your location.",
    "What is entropy in thermodynamics?",
    "Why do we have seasons on Earth?",
    "What was the Silk Road and what was traded along it?",
    "How do solar panels turn sunlight into electricity?",
    "What is the difference between RAM and storage in a computer?",
    "Explain the theory of evolution by natural selection.",
    "What happened during the Cuban Missile Crisis?",
    "How does the human heart pump blood around the body?",
    "What is a blockchain, and what problem does it try to solve?",
    "Explain supply and demand using the example of concert tickets.",
    "Why do some metals rust and others don't?",
    "What is the Pythagorean theorem and where is it used in real life?",
    "Give a short overview of the Industrial Revolution: when, where, and why it mattered.",
    "How do noise-cancelling headphones work?",
    "What is CRISPR and why is it important?",
    "Explain what an operating system does.",
    "In one paragraph, what is quantum entanglement?",
    "Who built the pyramids of Giza, and how do historians think they did it?",
    "What does a neuron do, and how do signals travel through the nervous system?",
]

_KNOWLEDGE_CONCEPTS = [
    "the theory of relativity",
    "compound interest",
    "how a compiler works",
    "the immune system",
    "ocean tides",
    "recursion in programming",
    "how neural networks learn",
    "the electoral college",
    "the placebo effect",
    "nuclear fission",
    "opportunity cost",
    "how new medicines are tested",
    "the carbon cycle",
    "how a search engine ranks pages",
    "the Doppler effect",
]
_KNOWLEDGE_EVENTS = [
    "the French Revolution",
    "the First World War",
    "the fall of the Western Roman Empire",
    "the Great Depression",
    "the American Civil War",
    "the Protestant Reformation",
    "the collapse of the Soviet Union",
    "the Black Death in Europe",
]
_KNOWLEDGE_PAIRS = [
    "a comet and an asteroid",
    "HTTP and HTTPS",
    "mitosis and meiosis",
    "a democracy and a republic",
    "speed and velocity",
    "stocks and bonds",
    "an alligator and a crocodile",
    "TCP and UDP",
    "a virus and a worm in computer security",
    "baking soda and baking powder",
]


def _knowledge(rng: random.Random) -> list[_Entry]:
    out = _hand(_KNOWLEDGE)
    for concept in _KNOWLEDGE_CONCEPTS:
        style = rng.choice(["in simple terms", "to a curious teenager", "as if I were new to the topic"])
        out.append(("t-explain", f"Explain {concept} {style}.", None))
    out += [("t-causes", f"What were the main causes and consequences of {e}?", None) for e in _KNOWLEDGE_EVENTS]
    out += [("t-difference", f"What is the difference between {p}?", None) for p in _KNOWLEDGE_PAIRS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# reasoning
# ---------------------------------------------------------------------------------------------------------------

_REASONING: list[str] = [
    (
        "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball "
        "cost? Think step by step."
    ),
    (
        "Three boxes are labelled 'apples', 'oranges' and 'mixed', but every label is wrong. You may take one fruit "
        "from one box. How can you relabel all the boxes correctly?"
    ),
    (
        "On an island, knights always tell the truth and knaves always lie. A says: 'B is a knave.' B says: "
        "'A and I are both knights.' What are A and B?"
    ),
    (
        "A farmer must carry a wolf, a goat and a cabbage across a river in a boat that holds only him and one "
        "item. Left alone, the wolf eats the goat and the goat eats the cabbage. How does he do it?"
    ),
    "If it takes 5 machines 5 minutes to make 5 widgets, how long would it take 100 machines to make 100 widgets?",
    "All roses are flowers. Some flowers fade quickly. Can we conclude that some roses fade quickly? Explain.",
    (
        "You have two ropes that each take exactly one hour to burn, but they burn unevenly. How can you measure "
        "45 minutes?"
    ),
    (
        "Five people sit in a row. Dan is at the left end and Eve sits next to him. Alice is not at either end. "
        "Bob sits immediately to the right of Carol. Give a possible seating order from left to right and explain."
    ),
    "In a race, you overtake the person in second place. What position are you in now?",
    (
        "A patch of lily pads doubles in size every day and covers the whole pond on day 48. On which day did it "
        "cover half the pond?"
    ),
    "Explain the Monty Hall problem and why switching doors is the better strategy.",
    (
        "There are 12 coins, and one of them is slightly heavier than the rest. Using a balance scale, what is the "
        "minimum number of weighings needed to find it? Describe the method."
    ),
    "If today is Wednesday, what day of the week will it be 100 days from now? Show your reasoning.",
    "Mary's father has five daughters: Nana, Nene, Nini and Nono. What is the name of the fifth daughter?",
    "A clock shows 3:15. What is the angle between the hour and minute hands?",
    "Is the sentence 'This sentence is false.' a paradox? Why?",
    "Tom is older than Jerry. Jerry is older than Spike. Is Spike older than Tom? Explain step by step.",
    (
        "Every student who studied passed the exam. Lena did not pass. What can we conclude about Lena, and which "
        "rule of logic is this?"
    ),
    (
        "A snail climbs 3 metres up a 10-metre well each day and slides down 2 metres each night. How many days "
        "does it take to get out?"
    ),
    "You have a 3-litre jug, a 5-litre jug and unlimited water. How can you measure exactly 4 litres?",
    "Which is heavier: a kilogram of feathers or a kilogram of steel? Why do people often get this wrong?",
    (
        "Four friends - Ana, Ben, Chen and Dita - each own a different pet: a cat, a dog, a fish and a parrot. "
        "Ana is allergic to fur. Ben's pet can talk. Chen walks his pet every morning. Who owns which pet?"
    ),
    (
        "A train leaves a station at 2 p.m. at 60 km/h. Another leaves the same station at 3 p.m. at 90 km/h in "
        "the same direction. When does the second train catch up?"
    ),
    "Find the flaw in this argument: 'Every time I wash my car, it rains. So washing my car causes rain.'",
    (
        "You are outside a closed room with three light switches, each controlling one of three bulbs inside. You "
        "may open the door only once. How do you find out which switch controls which bulb?"
    ),
    "If some programmers are musicians and all musicians are creative, must some programmers be creative?",
    (
        "A father is four times as old as his son. In 20 years he will be twice as old as his son. How old are they "
        "now? Solve it step by step."
    ),
    (
        "Two doors: one leads to freedom, one to a dungeon. One guard always lies, the other always tells the "
        "truth, and you don't know which is which. What single question do you ask?"
    ),
    (
        "Put these events in chronological order and explain how you decided: the invention of the telephone, the "
        "first Moon landing, the fall of Constantinople, the signing of the Magna Carta."
    ),
    "A PIN has 4 digits and no digit may repeat. How many possible PINs are there? Reason step by step.",
    "How many times do the hour and minute hands of a clock overlap in 24 hours?",
    "If you flip a fair coin three times, what is the probability of getting at least two heads? List the cases.",
    (
        "My plan: I'll leave home at 8:40, the bus takes 25 minutes, then I walk 10 minutes to the office, and my "
        "meeting starts at 9:15. Will I make it? What's the weakest point of this plan?"
    ),
    "A doctor gives you three pills and tells you to take one every half hour. How long will the pills last?",
]

_REASONING_SEQUENCES = [
    "2, 6, 12, 20, 30",
    "1, 1, 2, 3, 5, 8",
    "3, 9, 27, 81",
    "1, 4, 9, 16, 25",
    "J, F, M, A, M, J",
    "O, T, T, F, F, S, S",
    "2, 3, 5, 7, 11, 13",
    "100, 50, 25, 12.5",
    "1, 3, 6, 10, 15",
    "Z, X, V, T, R",
]
_REASONING_ARGUMENTS = [
    "If it rains, the street is wet. The street is wet. Therefore it rained.",
    "All mammals breathe air. Whales are mammals. Therefore whales breathe air.",
    "If the shop is open, the lights are on. The lights are off. Therefore the shop is closed.",
    "Most people in the survey liked the app. Jo was in the survey. Therefore Jo liked the app.",
    "No reptiles have fur. Some pets are reptiles. Therefore some pets have no fur.",
    "Either the printer is out of ink or it is unplugged. It is not out of ink. Therefore it is unplugged.",
]
_REASONING_ODD_ONE_OUT = [
    "apple, banana, carrot, cherry",
    "Mercury, Venus, Moon, Mars",
    "violin, cello, trumpet, viola",
    "square, triangle, cube, circle",
    "Paris, Berlin, Sydney, Madrid",
    "8, 27, 64, 100",
    "oak, maple, tulip, birch",
    "python, cobra, eagle, viper",
]


def _reasoning(rng: random.Random) -> list[_Entry]:
    out = _hand(_REASONING)
    for seq in _REASONING_SEQUENCES:
        out.append(("t-sequence", f"What comes next in the sequence {seq}, ...? Explain the pattern.", None))
    for arg in _REASONING_ARGUMENTS:
        out.append(("t-valid", f"Is the following argument logically valid? Explain why or why not.\n\n{arg}", None))
    for items in _REASONING_ODD_ONE_OUT:
        out.append(("t-odd", f"Which one does not belong: {items}? Explain your choice.", None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------------------------

_ARITHMETIC: list[str] = [
    "A recipe needs 250 g of flour for 4 people. How much flour do I need for 10 people?",
    "I drove 342 km and used 27 litres of fuel. What is my fuel consumption in litres per 100 km?",
    "A rectangle is 12 cm long and 7.5 cm wide. What are its area and perimeter?",
    "Three friends split a restaurant bill of $86.40 and add an 18% tip. How much does each person pay?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "A phone plan costs $25 a month plus $0.10 per text. If my bill was $31.70, how many texts did I send?",
    "What is 2 to the power of 12?",
    "Solve for x: 3x + 7 = 25.",
    "A tank holds 1,200 litres and drains at 40 litres per minute. How long until it's empty?",
    "What is the average of 17, 23, 35, 41 and 9?",
    "A pizza is cut into 8 equal slices and I eat 3. What percentage of the pizza is left?",
    "A car loses 12% of its value each year. If it is worth $20,000 now, what will it be worth in 3 years?",
    "How many seconds are there in a week?",
    "Calculate 47 x 38 without a calculator and explain each step.",
    "What is the square root of 196?",
    "A store sells 3 notebooks for $4.50. How much do 14 notebooks cost at the same rate?",
    "Divide 1,000 by 8 and give the answer as a decimal and as a fraction.",
    "A runner finishes a 10 km race in 52 minutes. What is her average pace per kilometre?",
    "I earn $18.50 an hour and work 37.5 hours a week. What's my weekly pay before tax?",
    "The price of a shirt went from $40 to $52. By what percentage did it increase?",
    "What is the least common multiple of 12 and 18?",
    "A circle has a radius of 5 cm. What is its area? Use pi = 3.14.",
    "There are 28 students in a class and the ratio of girls to boys is 4:3. How many girls are there?",
    "What is 0.375 written as a fraction in lowest terms?",
    (
        "Our team of 6 has to review 1,500 documents. Each person can review 40 documents an hour, and we work "
        "7-hour days. How many full working days will it take?"
    ),
]


def _change(rng: random.Random) -> str:
    item = rng.choice(["muffins", "croissants", "bus tickets", "postcards", "bagels"])
    price, n = rng.choice([0.75, 1.25, 1.8, 2.4, 3.15]), rng.randint(3, 12)
    bill = 20 if price * n <= 20 else 50
    return f"{item.capitalize()} cost ${price:.2f} each. If I buy {n} and pay with a ${bill} bill, what is my change?"


def _percent(rng: random.Random) -> str:
    return f"What is {rng.choice([5, 12, 15, 20, 35, 45, 60, 75])}% of {rng.randrange(40, 2000, 20)}?"


def _speed(rng: random.Random) -> str:
    h = rng.choice([1.5, 2, 2.5, 3, 4])
    vehicle = rng.choice(["train", "bus", "ferry", "truck"])
    return f"A {vehicle} travels {int(h * rng.randrange(40, 130, 5))} km in {h:g} hours. What is its average speed?"


def _multiply(rng: random.Random) -> str:
    return f"Calculate {rng.randint(12, 99)} times {rng.randint(12, 99)}. Show your working."


def _fraction(rng: random.Random) -> str:
    b, d = rng.choice([3, 4, 5, 6, 8]), rng.choice([3, 4, 5, 6, 10, 12])
    return f"Add {rng.randint(1, b - 1)}/{b} and {rng.randint(1, d - 1)}/{d}, and simplify the result."


def _discount(rng: random.Random) -> str:
    item = rng.choice(["jacket", "pair of boots", "lamp", "backpack", "coffee machine"])
    price, pct = rng.randrange(30, 300, 5), rng.choice([10, 15, 20, 25, 30, 40])
    return f"A {item} costs ${price} and is on sale for {pct}% off. What is the sale price?"


def _interest(rng: random.Random) -> str:
    p, r, t = rng.randrange(500, 10000, 250), rng.choice([2, 3, 3.5, 4, 5]), rng.randint(2, 10)
    return f"If I invest ${p} at {r:g}% simple interest per year, how much interest do I earn after {t} years?"


def _age(rng: random.Random) -> str:
    age, mult, years = rng.randint(4, 12), rng.choice([3, 4, 5]), rng.randint(2, 15)
    name = rng.choice(["Sam", "Lea", "Omar", "Yuki", "Ines"])
    return f"{name} is {age} and {name}'s mother is {mult} times as old. How old will she be in {years} years?"


_ARITHMETIC_TEMPLATES: dict[str, Callable[[random.Random], str]] = {
    "t-change": _change,
    "t-percent": _percent,
    "t-speed": _speed,
    "t-multiply": _multiply,
    "t-fraction": _fraction,
    "t-discount": _discount,
    "t-interest": _interest,
    "t-age": _age,
}


def _arithmetic(rng: random.Random, per_template: int = 5) -> list[_Entry]:
    out = _hand(_ARITHMETIC)
    for group, make in _ARITHMETIC_TEMPLATES.items():
        texts: list[str] = []
        while len(texts) < per_template:  # redraw numbers until the instances differ
            text = make(rng)
            if text not in texts:
                texts.append(text)
        out += [(group, t, None) for t in texts]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_python
# ---------------------------------------------------------------------------------------------------------------

_PYTHON: list[str] = [
    "Write a Python function `is_anagram(a, b)` that returns True if two strings are anagrams, ignoring case and "
    "spaces.",
    (
        "Why does this Python code print the wrong result, and how do I fix it?\n\n```python\n"
        "def add_item(item, items=[]):\n    items.append(item)\n    return items\n\n"
        "print(add_item(1))\nprint(add_item(2))\n```"
    ),
    (
        "Explain what this line does:\n\n```python\n"
        "top = {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:3]}\n```"
    ),
    (
        "Complete this function:\n\n```python\ndef chunk(lst, size):\n"
        '    """Split lst into lists of length size (the last one may be shorter)."""\n```'
    ),
    "Write a Python script that reads `sales.csv` (columns date,region,amount) and prints the total amount per "
    "region.",
    "How do I read a JSON file in Python and access a nested key?",
    "Write a Python class `Stack` with push, pop, peek and is_empty methods.",
    (
        'This code raises `TypeError: can only concatenate str (not "int") to str`. Fix it:\n\n```python\n'
        'age = 30\nprint("I am " + age + " years old")\n```'
    ),
    "Write a Python generator that yields the Fibonacci numbers forever.",
    "What's the difference between `==` and `is` in Python? Give an example where they disagree.",
    "Write a decorator in Python that measures and prints how long a function takes to run.",
    (
        "Refactor this code to be more Pythonic:\n\n```python\nsquares = []\nfor i in range(len(nums)):\n"
        "    if nums[i] % 2 == 0:\n        squares.append(nums[i] * nums[i])\n```"
    ),
    "Write a Python function that flattens a nested list of arbitrary depth.",
    "Use Python's `requests` library to fetch https://api.example.com/users and print each user's name. Handle "
    "HTTP errors.",
    "Write pytest unit tests for a function `slugify(text)` that lowercases text and replaces spaces with hyphens.",
    "How do I create and activate a virtual environment in Python?",
    "Write a Python dataclass `Book` with title, author, year and an optional ISBN, plus a method that returns a "
    "citation string.",
    "Explain list comprehensions vs generator expressions in Python and when to use each.",
    (
        "This loop never ends. Why?\n\n```python\ni = 0\nwhile i < 10:\n    if i % 2 == 0:\n        continue\n"
        "    i += 1\n```"
    ),
    "Write a Python function that counts word frequencies in a text file and returns the 10 most common words.",
    "Implement binary search in Python, returning the index of the target or -1.",
    "Write an async Python function that downloads three URLs concurrently with asyncio and aiohttp.",
    "How do I handle a `KeyError` when accessing a dictionary in Python? Show two approaches.",
    "Write a small Flask app with one route `/hello/<name>` that returns a greeting as JSON.",
    (
        "Add type hints to this function:\n\n```python\ndef merge(a, b):\n    out = dict(a)\n    out.update(b)\n"
        "    return out\n```"
    ),
    "Write a Python context manager that temporarily changes the working directory.",
    "Using pandas, how do I group a DataFrame by 'city' and compute the mean 'temperature'?",
    "Write a Python function that validates an email address with a regular expression, and explain the regex.",
    'what does `if __name__ == "__main__":` do in python',
]

_PYTHON_TASKS = [
    "returns the n-th prime number",
    "removes duplicates from a list while keeping the original order",
    "converts a Roman numeral to an integer",
    "checks whether a row of a Sudoku board is valid",
    "merges two sorted lists into one sorted list",
    "returns the longest common prefix of a list of strings",
    "rotates a square matrix 90 degrees clockwise",
    "computes the edit distance between two strings",
    "groups a list of words by their first letter",
    "turns a number of seconds into a string like '2h 5m 30s'",
    "parses a query string like 'a=1&b=2' into a dictionary",
    "finds all pairs in a list that sum to a target",
]
_PYTHON_HOWTOS = [
    "sort a list of dictionaries by one key",
    "read a large file line by line without loading it all into memory",
    "run a shell command and capture its output",
    "format a date as YYYY-MM-DD",
    "make an HTTP POST request with a JSON body",
    "swap the keys and values of a dictionary",
    "save an object to disk with pickle and load it back",
    "parse command-line arguments",
]


def _python(rng: random.Random) -> list[_Entry]:
    out = _hand(_PYTHON)
    for task in _PYTHON_TASKS:
        extra = rng.choice(["", " Include a docstring.", " Add a couple of example calls.", " Keep it short."])
        out.append(("t-func", f"Write a Python function that {task}.{extra}", None))
    out += [("t-howto", f"In Python, how do I {h}?", None) for h in _PYTHON_HOWTOS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_javascript
# ---------------------------------------------------------------------------------------------------------------

_JAVASCRIPT: list[str] = [
    "Write a JavaScript function that debounces another function.",
    "Explain the difference between `let`, `const` and `var` in JavaScript.",
    (
        "Why does this print `undefined`?\n\n```js\nfunction getUser() {\n"
        "  fetch('/api/user').then(res => res.json()).then(data => { return data; });\n}\n"
        "console.log(getUser());\n```"
    ),
    "Write a React component `Counter` with increment and decrement buttons.",
    (
        "Convert this callback code to async/await:\n\n```js\n"
        "fs.readFile('config.json', 'utf8', (err, text) => {\n  if (err) return console.error(err);\n"
        "  const config = JSON.parse(text);\n  console.log(config.port);\n});\n```"
    ),
    'Write a Node.js Express server with a GET /health route that returns {"status": "ok"}.',
    "What does `this` refer to inside an arrow function compared with a regular function?",
    "Write a function that deep-clones a plain JavaScript object without using JSON.stringify.",
    "How do I remove an element from an array by value in JavaScript?",
    "Explain what this does:\n\n```js\nconst categories = [...new Set(items.map(i => i.category))];\n```",
    "Write JavaScript that adds a click listener to every button with the class `like` and toggles the class "
    "`active`.",
    "What's the difference between `==` and `===` in JavaScript? Give three surprising examples.",
    "Write a TypeScript interface for a blog post (title, body, tags, optional publishedAt date) and a function "
    "that filters posts by tag.",
    (
        "Fix the bug:\n\n```js\nfor (var i = 0; i < 3; i++) {\n  setTimeout(() => console.log(i), 100);\n}\n"
        "// prints 3 3 3, I want 0 1 2\n```"
    ),
    "Implement a simple event emitter class in JavaScript with on, off and emit.",
    'Write a function that formats a number as US currency, e.g. 1234.5 -> "$1,234.50".',
    "How does the JavaScript event loop work? Mention microtasks and macrotasks.",
    "Write a fetch call that POSTs a JSON body to /api/login and handles a 401 response.",
    (
        "Complete the function:\n\n```js\n// Returns an object counting how many times each character appears\n"
        "function charCount(str) {\n```"
    ),
    "Write a JavaScript function that throttles scroll events to at most once every 200 ms.",
    "Explain closures in JavaScript with a counter example.",
    "How can I read query parameters from the current URL in the browser?",
    "Write a small script that validates a signup form: the email must contain '@' and the password must be at "
    "least 8 characters; show an error message under each invalid field.",
    "Explain what Promise.all, Promise.allSettled and Promise.race do, with examples.",
    "Write a Vue 3 component that shows a list of todos and lets the user add one.",
    "my node app says `SyntaxError: Cannot use import statement outside a module`. how do i fix it?",
]

_JS_TASKS = [
    "capitalises the first letter of every word in a sentence",
    "returns the intersection of two arrays",
    "checks whether the brackets in a string are balanced",
    "converts a camelCase string to snake_case",
    "splits an array into chunks of n elements",
    "returns the most frequent element of an array",
    "shuffles an array with the Fisher-Yates algorithm",
    "sums the digits of a number until one digit remains",
    "groups an array of objects by a given key",
    "checks whether two objects are deeply equal",
    "memoizes a function of one argument",
    "returns the number of days between two dates",
]
_JS_HOWTOS = [
    "copy an array",
    "check if a variable is an array",
    "wait for several promises at once",
    "store data in the browser between page loads",
    "compare two dates",
    "loop over the keys and values of an object",
    "round a number to two decimal places",
    "convert a string to a number safely",
]


def _javascript(rng: random.Random) -> list[_Entry]:
    out = _hand(_JAVASCRIPT)
    for task in _JS_TASKS:
        flavour = rng.choice(["JavaScript", "modern JavaScript (ES2020)", "TypeScript"])
        out.append(("t-func", f"Write a {flavour} function that {task}.", None))
    out += [("t-howto", f"In JavaScript, what is the best way to {h}?", None) for h in _JS_HOWTOS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_c (C and C++)
# ---------------------------------------------------------------------------------------------------------------

_C: list[str] = [
    "Write a C function that reverses a string in place.",
    "Explain the difference between `malloc` and `calloc` in C.",
    "Why does this C program crash?\n\n```c\nchar *s = \"hello\";\ns[0] = 'H';\n```",
    "Write a C++ class `Matrix` with a constructor, element access via operator(), and matrix multiplication.",
    "What is a dangling pointer? Show an example in C and how to avoid it.",
    "Write a C program that reads integers from standard input until EOF and prints their sum and average.",
    "Explain RAII in C++ with an example using a file handle.",
    (
        "Fix the memory leak:\n\n```c\nint *make_array(int n) {\n    int *a = malloc(n * sizeof(int));\n"
        "    for (int i = 0; i < n; i++) a[i] = i;\n    return a;\n}\n\nint main(void) {\n"
        "    for (int k = 0; k < 1000; k++) {\n        int *a = make_array(100);\n"
        '        printf("%d\\n", a[99]);\n    }\n}\n```'
    ),
    "What does the `static` keyword mean in C, inside a function and at file scope?",
    "Write a C++ function template `max_of` that returns the largest element of a std::vector<T>.",
    "Explain the difference between std::vector and std::list in C++ and when to use each.",
    "Implement a singly linked list in C with push_front, pop_front and print functions.",
    "What is undefined behaviour in C? Give three examples.",
    "Write a C++ program that counts word frequencies with std::unordered_map and prints them sorted by count.",
    "Explain `std::unique_ptr` vs `std::shared_ptr`.",
    (
        "Complete this C function:\n\n```c\n/* Returns 1 if n is a power of two, 0 otherwise. */\n"
        "int is_power_of_two(unsigned int n) {\n```"
    ),
    "Write a Makefile for a C project with src/main.c and src/util.c that builds an executable called app.",
    (
        "Why does this C++ code print garbage?\n\n```cpp\nconst std::string& name() {\n"
        '    std::string n = "Ada";\n    return n;\n}\n```'
    ),
    "Write a C function that swaps two integers using pointers, and explain why passing by value wouldn't work.",
    "What are move semantics in C++11? Show a class with a move constructor.",
    "Write a C program that copies one file to another with fopen, fread and fwrite, checking for errors.",
    "Explain what this C expression does: `x & (x - 1)`.",
    "Write a thread-safe counter in C++ using std::mutex, incremented by 4 std::thread workers.",
    "How do header files and include guards work in C?",
    "Write a C++ lambda that captures a point by reference and use it with std::sort to sort points by distance.",
    "Explain pointer arithmetic in C with an array example.",
    "What is the difference between a struct and a class in C++?",
    "gcc says `warning: implicit declaration of function 'strcpy'`. what am i missing?",
]

_C_TASKS = [
    "counts the number of set bits in an unsigned integer",
    "converts a string of digits to an int without atoi",
    "finds the second largest value in an int array",
    "removes all spaces from a string in place",
    "checks whether a year is a leap year",
    "computes the greatest common divisor of two numbers",
    "prints a multiplication table up to 10",
    "sorts an array of doubles with bubble sort",
    "returns the length of a string without using strlen",
    "checks whether a string is a palindrome, ignoring case",
]
_CPP_HOWTOS = [
    "split a std::string by a delimiter",
    "read a whole file into a std::string",
    "sort a vector of structs by one field",
    "convert an int to a std::string",
    "iterate over a std::map in order",
    "time a function with std::chrono",
    "remove the elements of a vector that match a condition",
    "use std::optional to return a value that may be missing",
]


def _c(rng: random.Random) -> list[_Entry]:
    out = _hand(_C)
    for task in _C_TASKS:
        extra = rng.choice(["", " Include a small main() that tests it.", " Comment each step."])
        out.append(("t-func", f"Write a C function that {task}.{extra}", None))
    out += [("t-howto", f"In C++, how do I {h}?", None) for h in _CPP_HOWTOS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_rust
# ---------------------------------------------------------------------------------------------------------------

_RUST: list[str] = [
    "Explain Rust's ownership rules in simple terms.",
    (
        "Why does this Rust code not compile, and how do I fix it?\n\n```rust\nfn main() {\n"
        '    let s = String::from("hi");\n    let t = s;\n    println!("{}", s);\n}\n```'
    ),
    "Write a Rust function that counts the words in a &str and returns a HashMap<String, usize>.",
    "What's the difference between String and &str in Rust?",
    "Write a Rust struct `Rectangle` with an `area` method and a `can_hold` method.",
    "Explain the `?` operator in Rust with an example that reads a file.",
    "Write a Rust enum `Shape` with Circle, Square and Triangle variants and a function that computes the area "
    "with a match.",
    (
        "Fix the borrow checker error:\n\n```rust\nlet mut v = vec![1, 2, 3];\nlet first = &v[0];\nv.push(4);\n"
        'println!("{}", first);\n```'
    ),
    "How do lifetimes work in Rust? Explain with a function that returns the longer of two string slices.",
    "Write a Rust program that reads lines from stdin and prints them in reverse order.",
    "Implement the Display trait for a `Point { x: f64, y: f64 }` struct.",
    "What's the difference between Box, Rc and Arc?",
    "Write a Rust function that parses a comma-separated string of numbers into a Vec<i32>, returning an error "
    "for bad input.",
    "How do I spawn threads in Rust and share a counter between them safely?",
    "Explain what `impl Trait` means in argument position and in return position.",
    (
        "Complete this Rust function:\n\n```rust\n/// Returns the n-th Fibonacci number using iteration.\n"
        "fn fib(n: u32) -> u64 {\n```"
    ),
    "Write a Cargo.toml for a binary crate that depends on serde (with the derive feature) and serde_json.",
    "Use iterators in Rust to sum the squares of the even numbers in a vector, in one expression.",
    "What is the difference between `Option` and `Result` in Rust? When should I use each?",
    "Write a generic Rust function `largest<T: PartialOrd>(list: &[T]) -> &T`.",
    (
        "Explain this Rust snippet:\n\n```rust\nlet adults: Vec<_> = people.iter().filter(|p| p.age >= 18)"
        ".map(|p| p.name.clone()).collect();\n```"
    ),
    "Write a simple async HTTP GET request in Rust using reqwest and tokio.",
    "How do I write unit tests in Rust? Show a test module for an `add` function.",
    "What does `#[derive(Debug, Clone, PartialEq)]` do?",
    "Write a Rust function that deserialises a JSON string into a struct with serde.",
    "Explain the difference between `iter()`, `iter_mut()` and `into_iter()`.",
    "What is a trait object (`dyn Trait`) and when would I use one instead of generics?",
    "rust says `cannot borrow *self as mutable more than once at a time` inside my loop, what's the usual fix",
]

_RUST_TASKS = [
    "checks whether a number is prime",
    "reverses the order of the words in a sentence",
    "returns the index of the minimum value in a slice of f64",
    "removes consecutive duplicates from a Vec",
    "converts a temperature from Celsius to Fahrenheit",
    "counts the vowels in a string",
    "merges two sorted vectors",
    "checks whether a string contains only ASCII digits",
    "computes the factorial of a u64 with overflow checking",
    "finds the most common character in a string",
]
_RUST_HOWTOS = [
    "read a file into a String",
    "sort a Vec of structs by a field",
    "convert a String to an integer",
    "iterate over a HashMap",
    "handle command-line arguments",
    "concatenate two strings",
    "define a constant",
    "return multiple values from a function",
]


def _rust(rng: random.Random) -> list[_Entry]:
    out = _hand(_RUST)
    for task in _RUST_TASKS:
        extra = rng.choice(["", " Add a test.", " Explain any borrowing involved."])
        out.append(("t-func", f"Write a Rust function that {task}.{extra}", None))
    out += [("t-howto", f"In Rust, how do I {h}?", None) for h in _RUST_HOWTOS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_sql
# ---------------------------------------------------------------------------------------------------------------

_SQL: list[str] = [
    "Write a SQL query that finds the total revenue per month from a table orders(id, customer_id, amount, "
    "created_at).",
    "Explain the difference between INNER JOIN, LEFT JOIN and FULL OUTER JOIN.",
    "Given tables employees(id, name, department_id, salary) and departments(id, name), write a query that "
    "returns the highest-paid employee in each department.",
    "What is the difference between WHERE and HAVING?",
    (
        "Fix this query:\n\n```sql\nSELECT customer_id, COUNT(*)\nFROM orders\nWHERE COUNT(*) > 5\n"
        "GROUP BY customer_id;\n```"
    ),
    "Write a CREATE TABLE statement for `users` with id, a unique email, a password hash and created_at "
    "defaulting to now.",
    "Explain what a database index is and when adding one can hurt performance.",
    "Write a SQL query that finds duplicate email addresses in a customers table.",
    "How do window functions work? Write a query that ranks products by sales within each category.",
    "Write a query to get the second highest salary from an employees table.",
    "What is database normalisation? Explain first, second and third normal form briefly.",
    "Write a SQL query that returns customers who have never placed an order, using customers(id, name) and "
    "orders(id, customer_id).",
    (
        "Explain what this query does:\n\n```sql\nSELECT d.name, AVG(e.salary) AS avg_salary\nFROM departments d\n"
        "JOIN employees e ON e.department_id = d.id\nGROUP BY d.name\nHAVING AVG(e.salary) > 60000\n"
        "ORDER BY avg_salary DESC;\n```"
    ),
    "Write a recursive CTE that lists all subordinates of the manager with id 7 in a table staff(id, name, "
    "manager_id).",
    "What's the difference between DELETE, TRUNCATE and DROP?",
    "Write an UPDATE statement that raises the price of every product in the 'books' category by 5%.",
    "How do transactions work in SQL? Explain ACID with the example of a bank transfer.",
    "Write a query that computes a 7-day moving average over daily_sales(day, total).",
    "Why is `SELECT *` often discouraged in production code?",
    "Write a SQL query that pivots monthly sales into columns Jan, Feb and Mar per product.",
    "What is SQL injection and how do parameterised queries prevent it?",
    "Write a query that returns the 3 most borrowed books from loans(book_id, member_id, loaned_at) and "
    "books(id, title).",
    (
        "Rewrite this subquery as a JOIN:\n\n```sql\nSELECT name FROM products\n"
        "WHERE category_id IN (SELECT id FROM categories WHERE active = 1);\n```"
    ),
    "In PostgreSQL, how do I select rows where the JSONB column `data` has data->>'status' equal to 'shipped'?",
    "Write SQL to insert three rows into a table pets(name, species, age) in one statement.",
    "my query with GROUP BY gives 'column must appear in the GROUP BY clause or be used in an aggregate "
    "function'. what does that mean?",
]

_SQL_TASKS = [
    ("students(id, name, grade, class)", "returns the average grade per class, highest first"),
    ("flights(id, origin, destination, departure, price)", "finds the cheapest flight from each origin"),
    ("logins(user_id, logged_in_at)", "counts distinct users per day over the last 30 days"),
    ("products(id, name, price, stock)", "lists products that are out of stock or cost more than 100"),
    ("movies(id, title, year, rating)", "returns the best-rated movie of each decade"),
    ("payments(id, user_id, amount, paid_at)", "finds users whose payments add up to more than 1000"),
    ("trips(id, driver_id, distance_km, started_at)", "returns each driver's longest trip"),
    ("events(id, name, starts_at, city)", "lists upcoming events in Berlin, soonest first"),
    ("reviews(id, product_id, stars)", "returns products with at least 10 reviews and an average above 4.5"),
    ("tickets(id, status, opened_at, closed_at)", "computes the average resolution time of closed tickets in hours"),
    ("sensor_readings(sensor_id, ts, value)", "returns the latest reading of every sensor"),
    ("invoices(id, client, issued_on, due_on, paid)", "lists overdue unpaid invoices"),
]
_SQL_HOWTOS = [
    "find rows where a column is NULL",
    "concatenate two text columns",
    "count rows per group and keep only groups with more than one row",
    "select a few random rows",
    "get the current date",
    "limit the results to the first 10 rows in both SQL Server and MySQL",
    "rename a column in an existing table",
    "combine the results of two SELECT queries without duplicates",
]


def _sql(rng: random.Random) -> list[_Entry]:
    out = _hand(_SQL)
    for schema, task in _SQL_TASKS:
        dialect = rng.choice(["", " Use PostgreSQL.", " Use SQLite.", " Use MySQL."])
        out.append(("t-query", f"Using a table {schema}, write a SQL query that {task}.{dialect}", None))
    out += [("t-howto", f"How do I {h} in SQL?", None) for h in _SQL_HOWTOS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# code_bash
# ---------------------------------------------------------------------------------------------------------------

_BASH: list[str] = [
    "Write a bash script that backs up a directory into a timestamped .tar.gz file.",
    "How do I find all files larger than 100 MB in my home directory?",
    "Explain what this command does: `find . -name '*.log' -mtime +7 -delete`",
    "Write a bash loop that renames every .jpeg file in the current folder to .jpg.",
    "What's the difference between `>` and `>>` in the shell?",
    (
        "Why does my script fail when a filename contains spaces?\n\n```bash\nfor f in $(ls *.txt); do\n"
        "  wc -l $f\ndone\n```"
    ),
    "How can I see which process is listening on port 8080?",
    "Write a one-liner that prints the 10 most common IP addresses in access.log (the IP is the first field).",
    "Explain `set -euo pipefail` at the top of a bash script.",
    "Write a bash function that retries a command up to 5 times with a 2-second pause between tries.",
    "How do I use grep to search recursively for 'TODO' in all .py files, showing line numbers?",
    "Write a script that checks whether a website returns HTTP 200 and prints an alert if it doesn't.",
    "What does `2>&1` mean?",
    "How do I schedule a script to run every day at 3 a.m. with cron?",
    "Use sed to replace every 'http://' with 'https://' in all .html files, editing them in place.",
    "Write a bash script that takes a filename as an argument and prints an error if the file doesn't exist.",
    "Explain the difference between single and double quotes in bash.",
    "Use awk to sum the third column of a CSV file, skipping the header line.",
    "How do I make a bash script executable and run it?",
    "Write a command that shows the disk usage of each subfolder, sorted by size, in human-readable form.",
    (
        "Complete this script so it prints each argument with its position:\n\n```bash\n#!/usr/bin/env bash\n"
        "# usage: ./args.sh a b c\n```"
    ),
    "A process ignores Ctrl+C. How do I find it and stop it from another terminal?",
    "What are environment variables, and how do I set one permanently in bash?",
    "Write a bash script that prints the lines of a file that are longer than 80 characters, with line numbers.",
    "Explain what `xargs` does, with an example.",
    "What is the difference between `source script.sh` and `./script.sh`?",
    "Write a command that extracts a .tar.bz2 archive into a specific folder.",
    "why does `cd` inside my script not change the directory of my terminal?",
]

_BASH_COMMANDS = [
    "count the number of files in a directory",
    "show the last 50 lines of a log file and keep following it",
    "compress a folder into a zip file",
    "list the 5 largest files in the current directory",
    "change the owner of a folder recursively",
    "download a file with curl and save it under a different name",
    "replace a word everywhere in a file",
    "check how much free memory the machine has",
    "print only the unique lines of a sorted file",
    "create a nested directory path including missing parents",
]
_BASH_SCRIPTS = [
    "prints the numbers from 1 to 20, replacing multiples of 3 with 'Fizz'",
    "creates a user-specified number of empty test files",
    "checks whether a given command is installed",
    "watches a file and prints a message whenever it changes",
    "lists all git branches already merged into main",
    "asks the user for their name and greets them",
    "converts every .png image in a folder to .jpg with ImageMagick",
    "deletes files older than 30 days in /tmp/reports",
]


def _bash(rng: random.Random) -> list[_Entry]:
    out = _hand(_BASH)
    for task in _BASH_COMMANDS:
        shell = rng.choice(["shell", "Linux", "bash"])
        out.append(("t-command", f"Give me a {shell} command to {task}.", None))
    out += [("t-script", f"Write a bash script that {t}.", None) for t in _BASH_SCRIPTS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# json
# ---------------------------------------------------------------------------------------------------------------

_JSON: list[str] = [
    "Return a JSON object describing a fictional book with title, author, year, genres (an array) and rating.",
    "Convert this text into JSON: 'Maria Lopez, 34, lives in Madrid and works as a nurse. She speaks Spanish and "
    "English.'",
    (
        "Fill this schema with realistic values and return only JSON:\n\n"
        '{"type": "object", "properties": {"order_id": {"type": "string"}, "items": {"type": "array", "items": '
        '{"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}}}, '
        '"total": {"type": "number"}}}'
    ),
    (
        "This JSON is invalid. Fix it and return the corrected version:\n\n"
        '{name: \'Sam\', \'age\': 25, "hobbies": ["chess", "tennis",]}'
    ),
    "Extract the date, time and place from this message as JSON: 'Let's meet on 14 March at 6:30 pm at the Blue "
    "Door cafe.'",
    "Give me a JSON array of five countries with their capital and population in millions.",
    (
        "Convert this CSV to a JSON array of objects:\n\nname,price,in_stock\nlamp,24.99,true\nchair,49.00,false\n"
        "desk,129.50,true"
    ),
    "Write a JSON Schema for a user profile with a required username (3-20 characters), an optional age "
    "(integer, 0-130) and a list of email addresses.",
    "Describe tomorrow's weather forecast as a JSON object with keys temperature_c, condition, wind_kph and "
    "precipitation_chance. Make up plausible values.",
    (
        "Turn this recipe into structured JSON with ingredients (name, amount, unit) and steps:\n\n"
        "Pancakes: mix 200 g flour, 2 eggs and 300 ml milk. Rest the batter 10 minutes. Fry ladlefuls in a hot "
        "buttered pan for 1-2 minutes per side."
    ),
    "Return only a JSON object, no prose: the keys are the planets of the solar system and the values their "
    "order from the Sun.",
    (
        "Convert this JSON to YAML:\n\n"
        '{"server": {"host": "0.0.0.0", "port": 8080}, "debug": false, '
        '"allowed_origins": ["https://a.com", "https://b.com"]}'
    ),
    (
        "Classify the sentiment of each review and answer in JSON as a list of objects with keys review and "
        "sentiment (positive, negative or neutral):\n1. The battery lasts forever, love it.\n"
        "2. Arrived broken and support never replied.\n3. It's a phone case. It does the job."
    ),
    "Create a JSON configuration for a web scraper: start URL, max depth, allowed domains, a user agent string "
    "and a delay in seconds.",
    'What\'s wrong with this JSON, and what error would a strict parser report?\n\n{"a": 1, "b": 2,}',
    "Produce a JSON object representing the chess position after 1. e4 e5, listing pieces by square.",
    (
        "Summarise this support ticket as JSON with fields customer, product, issue and urgency (low/medium/high): "
        "'Hi, this is Tom from Acme Ltd. Our X200 printer keeps jamming since yesterday and we have a big client "
        "presentation in two hours!'"
    ),
    "Make a JSON array of 4 quiz questions about the solar system, each with a question, 4 options and the index "
    "of the correct answer.",
    (
        "Flatten this JSON into a list of dotted key paths and their values:\n\n"
        '{"user": {"name": "Li", "address": {"city": "Oslo", "zip": "0150"}}, "active": true}'
    ),
    "Represent a family tree of three generations as nested JSON.",
    "Return a GeoJSON Feature for a point at the Eiffel Tower with a `name` property.",
    (
        "Parse this log line into JSON with timestamp, level, service and message:\n\n"
        "2024-05-02T14:03:11Z ERROR payment-api Card declined for order 8812"
    ),
    "Give me a JSON object with the nutrition facts of a banana: calories, carbohydrates_g, protein_g, fat_g, "
    "fiber_g.",
    "Output a JSON list of the days of the week, each with a boolean `is_weekend`.",
    "I have this Python dict: {'a': None, 'b': True, 'c': (1, 2)}. What is its JSON equivalent?",
    "Write a package.json for a small Node project called weather-cli with a start script and a dependency on axios.",
    (
        "Return a JSON object that validates against this schema:\n\n"
        '{"type": "object", "required": ["id", "tags"], "properties": {"id": {"type": "integer"}, '
        '"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2}, '
        '"note": {"type": ["string", "null"]}}}'
    ),
    "Extract every person and organisation in this sentence as JSON: 'Satya Nadella announced that Microsoft "
    "will partner with the University of Washington.'",
    "Make a JSON object describing a restaurant menu with three sections (starters, mains, desserts), each with "
    "two dishes and prices.",
    (
        "Convert this table to JSON:\n\n| Team | Wins | Losses |\n| --- | --- | --- |\n| Hawks | 10 | 4 |\n"
        "| Owls | 7 | 7 |\n| Foxes | 3 | 11 |"
    ),
]

_JSON_EXTRACT = [
    (
        "name, email, company, role",
        "Hello, I'm Priya Natarajan, head of design at Lumen Labs. You can reach me at priya@lumenlabs.io.",
    ),
    (
        "title, date, attendees, agenda",
        "Team sync on Friday 9 June. Present: Kai, Rosa, Olu. We will review Q2 goals and plan the offsite.",
    ),
    ("make, model, year, mileage_km, price_eur", "For sale: 2017 Toyota Corolla, 84,000 km, asking 11,500 euros."),
    ("city, date, high_c, low_c, summary", "Lyon, 3 October: sunny spells, highs of 19 degrees and lows of 8."),
    ("product, quantity, unit_price, customer", "Jonas ordered 3 packs of AA batteries at 4.99 each."),
    (
        "name, species, breed, age_years, vaccinated",
        "Our dog Biscuit is a four-year-old beagle and has had all his shots.",
    ),
    (
        "flight, from, to, departure, gate",
        "Flight LH 455 from Frankfurt to San Francisco leaves at 13:25 from gate Z52.",
    ),
    ("title, author, pages, published", "'The Quiet Orchard' by Helen Marsh, 312 pages, first published in 2009."),
]
_JSON_ARRAYS = [
    ("fictional employees", "id, name, department, salary"),
    ("songs", "title, artist, duration_seconds, genre"),
    ("to-do items", "id, task, done, due_date"),
    ("chemical elements", "symbol, name, atomic_number"),
    ("hotel rooms", "room_number, type, price_per_night, available"),
    ("board games", "name, min_players, max_players, average_minutes"),
    ("cities", "name, country, latitude, longitude"),
    ("support tickets", "ticket_id, priority, subject, assignee"),
]


def _json(rng: random.Random) -> list[_Entry]:
    out = _hand(_JSON)
    for keys, text in _JSON_EXTRACT:
        out.append(("t-extract", f"Convert the following into a JSON object with the keys {keys}:\n\n{text}", None))
    for things, fields in _JSON_ARRAYS:
        n = rng.randint(3, 6)
        out.append(
            (
                "t-array",
                f"Generate a JSON array of {n} {things}. Each item must have the fields {fields}. "
                "Output only the JSON.",
                None,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# tool_calls
# ---------------------------------------------------------------------------------------------------------------

_TOOL_CALLS: list[str | tuple[str, str]] = [
    (
        "You have two tools:\n1. get_weather(city: str)\n2. send_email(to: str, subject: str, body: str)\n"
        'The user says: "Check the weather in Lisbon and email it to ana@example.com."\n'
        "Respond with the list of JSON tool calls you would make, in order."
    ),
    (
        'Tools available: get_stock_price(ticker: str). The user asks: "What\'s the capital of Canada?" Decide '
        "whether a tool call is needed. If not, answer directly; if it is, respond with a JSON tool call."
    ),
    (
        "Available function: get_weather(city: str). The user wants to compare the weather in Paris, Berlin and "
        "Rome. Produce one tool call per city, as a JSON array."
    ),
    (
        'You called get_weather(city="Cairo") and it returned {"temp_c": 34, "condition": "sunny", '
        '"humidity": 18}. Write a one-sentence reply to the user, who asked whether it\'s a good day for a walk '
        "in Cairo."
    ),
    (
        'You can call book_hotel(city: str, check_in: str, nights: int). The user says: "Book me a hotel in '
        'Vienna." Some required arguments are missing. Either ask a clarifying question or make a JSON tool call, '
        "and explain your choice."
    ),
    (
        "Here is a function definition:\n"
        '{"name": "calculate_bmi", "parameters": {"type": "object", "properties": {"weight_kg": {"type": "number"}, '
        '"height_m": {"type": "number"}}, "required": ["weight_kg", "height_m"]}}\n'
        "User: I weigh 72 kilos and I'm 1.80 m tall, what's my BMI?\nReply with the function call as JSON."
    ),
    (
        "You control a smart home with the functions turn_on(device: str), turn_off(device: str) and "
        'set_thermostat(celsius: float). User: "It\'s freezing in here and too dark." Respond with the JSON tool '
        "calls that best satisfy the request."
    ),
    (
        'The tool get_stock_price(ticker: str) returned {"error": "unknown ticker \'APPL\'"} for the user\'s '
        "request 'price of Apple'. What tool call should you make next? Answer in JSON."
    ),
    (
        "Given the tool calculator(expression: str), which evaluates arithmetic expressions, the user asks: "
        "'What is 17.5% of 2,340 plus 99?' Respond with the tool call in JSON."
    ),
    (
        'Tool: wikipedia_search(query: str, language: str = "en"). User: "Find me the French Wikipedia article '
        'about the Eiffel Tower." Make the tool call as JSON and choose the language argument sensibly.'
    ),
    (
        "You are a travel assistant. Tool: get_train_times(from_station: str, to_station: str, after: str), where "
        "after is a time in HH:MM. Reply with a JSON tool call only.",
        "When's the next train from Zurich to Geneva after 5pm?",
    ),
    (
        "You can use these functions:\nlookup_order(order_id: str)\ncancel_order(order_id: str, reason: str)\n"
        'Call a function by replying with {"name": ..., "arguments": {...}}.',
        "Please cancel my order A-7731, I ordered the wrong size.",
    ),
    (
        "Write the JSON tool call for this request. Tool: resize_image(path: str, width: int, height: int, "
        "keep_aspect: bool). Request: make photo.png 800 pixels wide but don't squash it."
    ),
    (
        "You are a coding agent with the tools read_file(path: str), write_file(path: str, content: str) and "
        'run_tests(). The user says: "The tests in tests/test_math.py fail, please fix them." What is your first '
        "tool call? Reply in JSON and say briefly why."
    ),
    (
        'Function: get_news(topic: str, country: str, limit: int). A user writes: "anything new about electric '
        'cars in norway? just a couple headlines". Produce the JSON call with sensible values for every argument.'
    ),
    (
        "Tools: play_music(artist: str | None, song: str | None, playlist: str | None) and set_volume(level: int), "
        "with level from 0 to 100. Answer with a JSON array of tool calls.",
        "Put on some Miles Davis and turn it down a bit, to about 30.",
    ),
    (
        "Given the tools create_invoice(client: str, amount: float, currency: str, due_in_days: int) and "
        "send_email(to: str, subject: str, body: str), plan the calls for: 'Bill Northwind Traders 1,200 euros, "
        "due in two weeks, and email the invoice to accounts@northwind.com.' Output a JSON array of calls; refer "
        "to the result of the first call as $invoice."
    ),
]

# (name, parameters as (name, type, description), tool description, user requests)
_TOOLS: list[tuple[str, list[tuple[str, str, str]], str, list[str]]] = [
    (
        "get_weather",
        [("city", "string", "city name"), ("unit", "string", "'celsius' or 'fahrenheit'")],
        "Get the current weather for a city.",
        [
            "What's the weather like in Oslo right now?",
            "Is it hot in Phoenix today? Give it to me in Fahrenheit.",
            "Do I need an umbrella in Dublin this afternoon?",
            "Tell me the temperature in Nairobi in celsius.",
            "How cold is it in Montreal at the moment?",
        ],
    ),
    (
        "search_flights",
        [
            ("origin", "string", "departure city or airport"),
            ("destination", "string", "arrival city or airport"),
            ("date", "string", "YYYY-MM-DD"),
        ],
        "Search for flights on a given date.",
        [
            "Find me a flight from London to Rome on 12 May 2025.",
            "I need to fly from JFK to LAX on 2025-03-14.",
            "Are there flights from Singapore to Sydney on the 1st of December 2025?",
            "Look up flights Berlin to Madrid, 2025-07-04.",
            "Can you check flights from Toronto to Vancouver for June 20, 2025?",
        ],
    ),
    (
        "send_email",
        [
            ("to", "string", "recipient address"),
            ("subject", "string", "subject line"),
            ("body", "string", "message text"),
        ],
        "Send an email on the user's behalf.",
        [
            "Email sarah@example.com and tell her the meeting moved to 3 pm.",
            "Send a note to dev-team@acme.io with subject 'Release' saying version 2.1 is live.",
            "Write to my landlord at j.smith@mail.com that the heating is broken again.",
            "Please email hr@company.org asking for a copy of my contract.",
            "Let bob@example.net know I'll be 10 minutes late.",
        ],
    ),
    (
        "create_event",
        [
            ("title", "string", "event title"),
            ("start", "string", "ISO 8601 date-time"),
            ("duration_minutes", "integer", "length of the event"),
        ],
        "Add an event to the user's calendar.",
        [
            "Put a dentist appointment in my calendar on 2025-04-03 at 9:30 for 45 minutes.",
            "Schedule a one-hour call with Priya on 2025-02-11 at 14:00.",
            "Block two hours on 2025-09-01 from 10am for deep work.",
            "Add 'Mum's birthday dinner' on 2025-06-15 at 19:00, about three hours.",
            "Create a 15-minute stand-up at 09:00 on 2025-01-06.",
        ],
    ),
    (
        "convert_currency",
        [
            ("amount", "number", "amount to convert"),
            ("from_currency", "string", "ISO code"),
            ("to_currency", "string", "ISO code"),
        ],
        "Convert an amount of money between currencies at today's rate.",
        [
            "How much is 250 euros in US dollars?",
            "Convert 10,000 yen to British pounds.",
            "What's 99.99 CAD in EUR?",
            "I have 500 Swiss francs. How many Australian dollars is that?",
            "Change 1,250 Indian rupees into dollars.",
        ],
    ),
    (
        "get_stock_price",
        [("ticker", "string", "stock ticker symbol")],
        "Get the latest trading price of a stock.",
        [
            "What's Apple trading at?",
            "Give me the latest price for MSFT.",
            "How is Tesla's stock doing right now?",
            "Check the share price of NVIDIA for me.",
            "What is the current price of ticker AMZN?",
        ],
    ),
    (
        "set_timer",
        [("minutes", "integer", "duration in minutes"), ("label", "string", "what the timer is for")],
        "Start a countdown timer.",
        [
            "Set a timer for 12 minutes for the pasta.",
            "Remind me in half an hour to take the laundry out.",
            "Timer, 3 minutes, tea.",
            "Start a 25-minute focus timer.",
            "Can you set an hour and a half timer labelled 'roast'?",
        ],
    ),
    (
        "search_web",
        [("query", "string", "search terms"), ("max_results", "integer", "default 5")],
        "Search the web and return the top results.",
        [
            "Look up who won the 2018 FIFA World Cup.",
            "Search for vegan lasagna recipes, just the top 3.",
            "Find news about the James Webb Space Telescope.",
            "Search the web for how to fix a squeaky door hinge.",
            "What are people saying about the new Zelda game? Search for reviews.",
        ],
    ),
    (
        "translate_text",
        [("text", "string", "text to translate"), ("target_language", "string", "language name")],
        "Translate text into another language.",
        [
            "Translate 'Where is the train station?' into German.",
            "How do you say 'thank you very much' in Japanese?",
            "Translate this to French: 'The meeting has been postponed until next week.'",
            "Can you put 'I love this city' into Portuguese?",
            "Translate 'Please close the door' into Italian.",
        ],
    ),
    (
        "add_todo",
        [
            ("task", "string", "task text"),
            ("due_date", "string or null", "YYYY-MM-DD"),
            ("priority", "string", "'low', 'medium' or 'high'"),
        ],
        "Add an item to the user's to-do list.",
        [
            "Add 'renew passport' to my to-do list, high priority, due 2025-05-01.",
            "Remind me to buy milk. Low priority.",
            "Put 'call the plumber' on my list for 2025-03-02.",
            "New task: finish the quarterly report by Friday 2025-03-28, it's urgent.",
            "Add water the plants to my todos.",
        ],
    ),
    (
        "get_directions",
        [
            ("origin", "string", "start"),
            ("destination", "string", "end"),
            ("mode", "string", "'driving', 'walking', 'transit' or 'cycling'"),
        ],
        "Get a route between two places.",
        [
            "How do I get from the Louvre to the Eiffel Tower on foot?",
            "Directions from Union Station to Wrigley Field by train, please.",
            "What's the best driving route from Leeds to York?",
            "I want to cycle from Amsterdam Centraal to Vondelpark.",
            "Take me from the Hilton Tokyo to Shibuya Crossing by public transport.",
        ],
    ),
    (
        "query_database",
        [("sql", "string", "a read-only SQL query")],
        "Run a SQL query against the shop database (tables: customers, orders, products).",
        [
            "How many orders did we get last month?",
            "Which five products are the most expensive?",
            "Show me all customers from Germany.",
            "What's the total revenue across all orders?",
            "List the orders above 500 euros.",
        ],
    ),
    (
        "book_restaurant",
        [
            ("restaurant", "string", "restaurant name"),
            ("date", "string", "YYYY-MM-DD"),
            ("time", "string", "HH:MM"),
            ("party_size", "integer", "number of guests"),
        ],
        "Reserve a table at a restaurant.",
        [
            "Book a table for four at Nando's on 2025-08-09 at 7pm.",
            "Reserve Osteria Francescana for two on 2025-10-14, 20:30.",
            "Can you get us a table at The Ivy on 2025-04-22 at 12:30 for six people?",
            "I'd like a booking at Sushi Zen for 3 people on 2025-05-05 at 18:00.",
            "Table for one at Cafe Luna, 2025-06-01, 08:15.",
        ],
    ),
]


def _tool_signature(name: str, params: list[tuple[str, str, str]]) -> str:
    types = {"string": "str", "integer": "int", "number": "float", "string or null": "str | None"}
    return f"{name}(" + ", ".join(f"{p}: {types[t]}" for p, t, _ in params) + ")"


def _tool_schema(name: str, params: list[tuple[str, str, str]], desc: str) -> str:
    props = {p: {"type": t if t != "string or null" else ["string", "null"], "description": d} for p, t, d in params}
    return json.dumps({"name": name, "description": desc, "parameters": {"type": "object", "properties": props}})


def _tool_calls(rng: random.Random) -> list[_Entry]:
    out = _hand(_TOOL_CALLS)
    call_format = '{"name": <function name>, "arguments": {<argument>: <value>, ...}}'
    for name, params, desc, requests in _TOOLS:
        group = f"tool-{name}"
        sig, schema = _tool_signature(name, params), _tool_schema(name, params, desc)
        layouts = [0, 1, 2, rng.randrange(3), rng.randrange(3)]
        rng.shuffle(layouts)
        for request, layout in zip(requests, layouts):
            if layout == 0:  # everything inline, plain-language description
                prompt = (
                    f'You can call the function {sig}. {desc}\nThe user asks: "{request}"\n'
                    f"Respond with a JSON tool call of the form {call_format}."
                )
                out.append((group, prompt, None))
            elif layout == 1:  # tool list in the system prompt, the request alone as the user turn
                system = (
                    f"You are a helpful assistant with access to tools.\nAvailable tools:\n- {sig}: {desc}\n"
                    f"When a tool is needed, reply only with a JSON object {call_format}."
                )
                out.append((group, request, system))
            else:  # JSON function schema in the prompt
                prompt = f"Tools:\n{schema}\n\nUser: {request}\n\nCall the right tool. Output JSON only."
                out.append((group, prompt, None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------------------------


def _hand(items: _Hand) -> list[_Entry]:
    """Hand-written prompts, each in its own group ``h<nnn>``; an item may be ``(system, prompt)``."""
    out: list[_Entry] = []
    for i, item in enumerate(items):
        system, prompt = item if isinstance(item, tuple) else (None, item)
        out.append((f"h{i:03d}", prompt, system))
    return out


_BUILDERS: dict[str, Callable[[random.Random], list[_Entry]]] = {
    "chat": _chat,
    "writing": _writing,
    "knowledge": _knowledge,
    "reasoning": _reasoning,
    "arithmetic": _arithmetic,
    "code_python": _python,
    "code_javascript": _javascript,
    "code_c": _c,
    "code_rust": _rust,
    "code_sql": _sql,
    "code_bash": _bash,
    "json": _json,
    "tool_calls": _tool_calls,
}
if tuple(_BUILDERS) != BROAD_CATEGORIES:  # pragma: no cover - guards edits to the tables above
    raise RuntimeError("_BUILDERS and BROAD_CATEGORIES disagree")


def broad_prompts(seed: int = 0) -> list[dict[str, Any]]:
    """Build the prompt set: a list of ``{"id", "category", "group", "prompt"}`` dicts (some add ``"system"``).

    Deterministic for a given ``seed``: the seed only changes which filler combinations and numbers the templates
    draw. Every prompt text is unique, also after :func:`normalize_prompt`; a ``RuntimeError`` says otherwise.
    """
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for category in BROAD_CATEGORIES:
        rng = random.Random(f"atlas-broad:{seed}:{category}")
        for group, text, system in _BUILDERS[category](rng):
            key = normalize_prompt(text)
            if key in seen:
                raise RuntimeError(f"duplicate prompt in {category}/{group}: {text[:80]!r}")
            seen.add(key)
            digest = zlib.crc32(((system or "") + "\x00" + text).encode("utf-8"))
            item: dict[str, Any] = {
                "id": f"{category}-{group}-{digest:08x}",
                "category": category,
                "group": f"{category}/{group}",
                "prompt": text,
            }
            if system is not None:
                item["system"] = system
            prompts.append(item)
    return prompts


def _group_of(prompt: dict[str, Any]) -> str:
    """The split unit of a prompt: its ``group``, or its ``id`` when it has none (then it stands alone)."""
    return str(prompt.get("group") or prompt["id"])


def split_prompts(
    prompts: Sequence[dict[str, Any]], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``prompts`` into ``(train, held_out)``, stratified by category and never splitting a group.

    For each category the groups are shuffled with a seeded RNG and taken greedily into the held-out part while
    they fit into ``round(held_out_fraction * n_category)`` prompts (at least one); if no group fits, the smallest
    one is taken. A category with a single group stays entirely in train. Because whole groups move, no held-out
    prompt shares a template (or, for tool calls, a tool description) with a training prompt; in practice the
    held-out part is mostly hand-written prompts plus the occasional small template group. Both parts keep the
    input order. Deterministic for a given ``seed``.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    sizes: dict[str, dict[str, int]] = {}
    for p in prompts:
        groups = sizes.setdefault(str(p["category"]), {})
        g = _group_of(p)
        groups[g] = groups.get(g, 0) + 1
    held: set[str] = set()
    for category, groups in sizes.items():
        if len(groups) < 2:
            continue
        n = sum(groups.values())
        target = max(1, round(held_out_fraction * n))
        order = sorted(groups)
        random.Random(f"atlas-split:{seed}:{category}").shuffle(order)
        taken = 0
        for g in order:
            if taken >= target:
                break
            if taken + groups[g] <= target:
                held.add(g)
                taken += groups[g]
        if taken == 0:
            held.add(min(order, key=lambda g: groups[g]))
    train = [p for p in prompts if _group_of(p) not in held]
    held_out = [p for p in prompts if _group_of(p) in held]
    return train, held_out
