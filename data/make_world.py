"""Write the toy world: a fictional corpus and multi-hop questions about it.

Every name here is invented, so no pretrained model knows the answers: an agent has to search, and for
multi-hop questions it has to carry what it found from one turn to the next in its memory.

The world has countries, cities, people and novels:

    country  -- "{country} is a country whose capital is {city}."
    city     -- "{city} is a city in the country of {country}."
    person   -- "{person} was born in {city}."                     (the bio passage)
                "{person} worked as a {job} near {other city}."     (the work passage)
    novel    -- "{title} is a novel by the author {person}."

People share first and last names and novels share title words, so BM25 returns look-alike passages next to
the right one. Questions come in four types:

    1-hop         Where was Ilvo Marsk born?                                 bio
    2-hop bridge  In which country was Ilvo Marsk born?                      bio -> city
    3-hop bridge  In which country was the author of X born?                 novel -> bio -> city
    comparison    Were Ilvo Marsk and Dena Quell born in the same city?      bio, bio  (yes / no)

There are no numbers in this world on purpose: Qwen's tokenizer splits a number into single digits, and
copying digit strings is much harder for a tiny model than copying names.

Each question records its supporting passages in hop order, with the query an expert would search for, the
fact (the passage's sentence) it would keep in memory, and what that hop finds (a city, a job, a name):
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
TYPE_SHARES = {"1-hop": 0.20, "2-hop bridge": 0.35, "3-hop bridge": 0.25, "comparison": 0.20}

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
    job_of = {p: rng.choice(JOBS) for p in people}
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
        add_passage(("bio", p), p, f"{p} was born in {born_in[p]}.")
        work_city = rng.choice([c for c in cities if c != born_in[p]])
        article = "an" if job_of[p][0] in "aeiou" else "a"
        add_passage(("work", p), p, f"{p} worked as {article} {job_of[p]} near {work_city}.")
    for novel in novels:
        add_passage(("novel", novel), novel, f"{novel} is a novel by the author {author_of[novel]}.")
    rng.shuffle(passages)  # ids stay; order should not hint at anything

    text_of = {p["id"]: p["contents"].split("\n", 1)[1] for p in passages}

    def hop(key, query, finding):
        return {"doc_id": doc_of[key], "query": query, "fact": text_of[doc_of[key]], "finding": str(finding)}

    world = dict(people=people, novels=novels, cities=cities, country_of=country_of, born_in=born_in,
                 job_of=job_of, author_of=author_of, hop=hop)
    return world, passages


def make_question(rng, world, qtype):
    """One question of the given type: (question, answer, support chain)."""
    w, hop = world, world["hop"]

    def bio(p):                                  # the hop that finds where p was born
        return hop(("bio", p), f"{p} born", w["born_in"][p])

    def author(novel):                           # the hop that finds who wrote a novel
        return hop(("novel", novel), f"{novel} author", w["author_of"][novel])

    def country(city):                           # the hop that finds a city's country
        return hop(("city", city), f"{city} country", w["country_of"][city])

    def job(p):                                  # the hop that finds what p worked as
        return hop(("work", p), f"{p} worked", w["job_of"][p])

    p, novel, city = rng.choice(w["people"]), rng.choice(w["novels"]), rng.choice(w["cities"])
    writer = w["author_of"][novel]
    if qtype == "1-hop":
        return rng.choice([
            (f"Where was {p} born?", w["born_in"][p], [bio(p)]),
            (f"What did {p} work as?", w["job_of"][p], [job(p)]),
            (f"Who wrote {novel}?", writer, [author(novel)]),
            (f"In which country is {city}?", w["country_of"][city], [country(city)])])
    if qtype == "2-hop bridge":
        return rng.choice([
            (f"In which country was {p} born?", w["country_of"][w["born_in"][p]], [bio(p), country(w["born_in"][p])]),
            (f"Where was the author of {novel} born?", w["born_in"][writer], [author(novel), bio(writer)]),
            (f"What did the author of {novel} work as?", w["job_of"][writer], [author(novel), job(writer)])])
    if qtype == "3-hop bridge":
        birthplace = w["born_in"][writer]
        return (f"In which country was the author of {novel} born?", w["country_of"][birthplace],
                [author(novel), bio(writer), country(birthplace)])
    if qtype == "comparison":                    # half the pairs share a birthplace
        same = [q for q in w["people"] if q != p and w["born_in"][q] == w["born_in"][p]]
        other = rng.choice(same) if same and rng.random() < 0.5 else rng.choice(w["people"])
        answer = "yes" if w["born_in"][other] == w["born_in"][p] else "no"
        return f"Were {p} and {other} born in the same city?", answer, [bio(p), bio(other)]
    raise ValueError(f"unknown question type {qtype!r}")


def make_questions(rng, world, n):
    """n distinct questions with the type mix of TYPE_SHARES."""
    types = [t for t, share in TYPE_SHARES.items() for _ in range(round(share * n))]
    types = (types + ["1-hop"] * n)[:n]
    rng.shuffle(types)
    seen, records = set(), []
    for qtype in types:
        for _ in range(10_000):
            question, answer, support = make_question(rng, world, qtype)
            if question not in seen:
                break
        else:
            raise ValueError(f"cannot find {n} distinct questions: the world is too small for that many")
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
