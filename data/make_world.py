"""Write the toy world: a fictional corpus and multi-hop questions about it.

Every name here is invented, so no pretrained model knows the answers: an agent has to search, and for
multi-hop questions it has to carry what it found from one turn to the next in its memory.

The world has countries, cities, people and novels:

    country  -- "{country} is a country whose capital is {city}."
    city     -- "{city} is a city in the country of {country}."
    person   -- "{person} was born in {city} in {year}."           (the bio passage)
                "{person} worked as a {job} in {other city}."       (a distractor for "born in")
    novel    -- "{title} is a novel by the author {person}."

People share first and last names and novels share title words, so BM25 returns look-alike passages next to
the right one. Questions come in four types:

    1-hop         Where was Ilvo Marsk born?                       bio
    2-hop bridge  In which country was Ilvo Marsk born?            bio -> city
    3-hop bridge  In which country was the author of X born?       novel -> bio -> city
    comparison    Who was born first, Ilvo Marsk or Dena Quell?    bio, bio

Each question records its supporting passages in hop order, with the query an expert would search for, the
fact (the passage's sentence) it would keep in memory, and what that hop finds (a city, a year, a name):
`support: [{"doc_id", "query", "fact", "finding"}, ...]`.
memsearcher.py uses that chain to script the expert trajectories of its CPU warm start.

Output, FlashRAG formats: corpus.jsonl {"id", "contents": "Title\\ntext"}; train.jsonl and test.jsonl
{"id", "question", "golden_answers", "type", "support"}. The generator is deterministic (seeded);
test_memsearcher.py checks that running it again reproduces the committed files byte for byte.

    python data/make_world.py            # rewrites data/*.jsonl
    python data/make_world.py --out DIR  # writes elsewhere
"""
import argparse
import json
import random
from pathlib import Path

SEED = 2511
N_COUNTRIES, N_CITIES, N_PEOPLE, N_NOVELS = 30, 240, 1000, 900
N_TRAIN, N_TEST = 2400, 300
TYPE_SHARES = {"1-hop": 0.30, "2-hop bridge": 0.30, "3-hop bridge": 0.15, "comparison": 0.25}

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr",
          "st", "sh", "th", "gl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "oa"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th"]
CITY_ENDINGS = ["mere", "holt", "vik", "ford", "by", "stad", "wick", "burg"]
COUNTRY_ENDINGS = ["ia", "and", "ora", "istan", "ovia"]
TITLE_NOUNS = ["Orchard", "Harbor", "Lantern", "River", "Mirror", "Garden", "Tower", "Winter", "Bridge",
               "Sparrow", "Compass", "Island", "Letter", "Forest", "Crown", "Shadow", "Voyage", "Silence"]
JOBS = ["painter", "teacher", "sailor", "baker", "surgeon", "architect", "farmer", "printer", "judge",
        "weaver", "chemist", "pilot", "librarian", "engineer", "singer"]


def invent_word(rng, syllables):
    """A pronounceable made-up word such as 'Brelon' or 'Taimik'."""
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
    return word.capitalize()


def invent_unique(rng, n, make, taken):
    """n new names from make(rng), none already in the set taken (which is updated)."""
    names = []
    while len(names) < n:
        name = make(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_world(rng):
    """Entities, their facts, and the corpus passages that state those facts."""
    taken = set()
    countries = invent_unique(rng, N_COUNTRIES, lambda r: invent_word(r, 2) + r.choice(COUNTRY_ENDINGS), taken)
    cities = invent_unique(rng, N_CITIES, lambda r: invent_word(r, 1) + r.choice(CITY_ENDINGS), taken)
    first_names = invent_unique(rng, 150, lambda r: invent_word(r, 2), taken)
    last_names = invent_unique(rng, 300, lambda r: invent_word(r, 2) + r.choice(["", "s", "son", "ek"]), taken)
    people = invent_unique(rng, N_PEOPLE, lambda r: f"{r.choice(first_names)} {r.choice(last_names)}", taken)
    title_words = invent_unique(rng, 120, lambda r: invent_word(r, 1), taken)
    novels = invent_unique(rng, N_NOVELS, lambda r: f"The {r.choice(title_words)} {r.choice(TITLE_NOUNS)}", taken)

    country_of = {city: countries[i % N_COUNTRIES] if i < N_COUNTRIES else rng.choice(countries)
                  for i, city in enumerate(cities)}                     # every country gets at least one city
    capital_of = {country: cities[i] for i, country in enumerate(countries)}
    born_in = {p: rng.choice(cities) for p in people}
    born_year = {p: rng.randint(1900, 1989) for p in people}
    author_of = {novel: rng.choice(people) for novel in novels}

    passages, doc_of = [], {}

    def add_passage(key, title, text):
        doc_of[key] = f"d{len(passages):05d}"
        passages.append({"id": doc_of[key], "contents": f"{title}\n{text}"})

    for country in countries:
        add_passage(("country", country), country, f"{country} is a country whose capital is {capital_of[country]}.")
    for city in cities:
        add_passage(("city", city), city, f"{city} is a city in the country of {country_of[city]}.")
    for p in people:
        add_passage(("bio", p), p, f"{p} was born in {born_in[p]} in {born_year[p]}.")
        work_city = rng.choice([c for c in cities if c != born_in[p]])
        job = rng.choice(JOBS)
        add_passage(("work", p), p, f"{p} worked as {'an' if job[0] in 'aeiou' else 'a'} {job} in {work_city}.")
    for novel in novels:
        add_passage(("novel", novel), novel, f"{novel} is a novel by the author {author_of[novel]}.")
    rng.shuffle(passages)  # ids stay; order should not hint at anything

    text_of = {p["id"]: p["contents"].split("\n", 1)[1] for p in passages}

    def hop(key, query, finding):
        return {"doc_id": doc_of[key], "query": query, "fact": text_of[doc_of[key]], "finding": str(finding)}

    world = dict(people=people, novels=novels, cities=cities, country_of=country_of, born_in=born_in,
                 born_year=born_year, author_of=author_of, hop=hop)
    return world, passages


def make_question(rng, world, qtype):
    """One question of the given type: (question, answer, support chain)."""
    w, hop = world, world["hop"]
    if qtype == "1-hop":
        kind = rng.randrange(4)
        if kind == 0:
            p = rng.choice(w["people"])
            return f"Where was {p} born?", w["born_in"][p], [hop(("bio", p), f"{p} born", w["born_in"][p])]
        if kind == 1:
            p = rng.choice(w["people"])
            year = w["born_year"][p]
            return f"In which year was {p} born?", str(year), [hop(("bio", p), f"{p} born", year)]
        if kind == 2:
            novel = rng.choice(w["novels"])
            author = w["author_of"][novel]
            return f"Who wrote {novel}?", author, [hop(("novel", novel), f"{novel} author", author)]
        city = rng.choice(w["cities"])
        country = w["country_of"][city]
        return f"In which country is {city}?", country, [hop(("city", city), f"{city} country", country)]
    if qtype == "2-hop bridge":
        kind = rng.randrange(3)
        if kind == 0:
            p = rng.choice(w["people"])
            city = w["born_in"][p]
            return (f"In which country was {p} born?", w["country_of"][city],
                    [hop(("bio", p), f"{p} born", city), hop(("city", city), f"{city} country", w["country_of"][city])])
        novel = rng.choice(w["novels"])
        p = w["author_of"][novel]
        answer = w["born_in"][p] if kind == 1 else str(w["born_year"][p])
        chain = [hop(("novel", novel), f"{novel} author", p), hop(("bio", p), f"{p} born", answer)]
        if kind == 1:
            return f"Where was the author of {novel} born?", answer, chain
        return f"In which year was the author of {novel} born?", answer, chain
    if qtype == "3-hop bridge":
        novel = rng.choice(w["novels"])
        p = w["author_of"][novel]
        city = w["born_in"][p]
        return (f"In which country was the author of {novel} born?", w["country_of"][city],
                [hop(("novel", novel), f"{novel} author", p), hop(("bio", p), f"{p} born", city),
                 hop(("city", city), f"{city} country", w["country_of"][city])])
    if qtype == "comparison":
        while True:
            a, b = rng.sample(w["people"], 2)
            if w["born_year"][a] != w["born_year"][b]:
                break
        first = a if w["born_year"][a] < w["born_year"][b] else b
        return (f"Who was born first, {a} or {b}?", first,
                [hop(("bio", a), f"{a} born", w["born_year"][a]), hop(("bio", b), f"{b} born", w["born_year"][b])])
    raise ValueError(f"unknown question type {qtype!r}")


def make_questions(rng, world, n):
    """n distinct questions with the type mix of TYPE_SHARES."""
    types = [t for t, share in TYPE_SHARES.items() for _ in range(round(share * n))]
    types = (types + ["1-hop"] * n)[:n]
    rng.shuffle(types)
    seen, records = set(), []
    for qtype in types:
        while True:
            question, answer, support = make_question(rng, world, qtype)
            if question not in seen:
                break
        seen.add(question)
        records.append({"question": question, "golden_answers": [answer], "type": qtype, "support": support})
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(out_dir):
    rng = random.Random(SEED)
    world, passages = build_world(rng)
    questions = make_questions(rng, world, N_TRAIN + N_TEST)
    splits = {"test": questions[:N_TEST], "train": questions[N_TEST:]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "corpus.jsonl", passages)
    for split, records in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl",
                    [{"id": f"{split}-{i:04d}", **record} for i, record in enumerate(records)])
    print(f"wrote {len(passages)} passages, {len(splits['train'])} train and {len(splits['test'])} test "
          f"questions to {out_dir}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=Path(__file__).parent, help="output folder (default: data/)")
    main(parser.parse_args().out)
