"""The embedded default dataset: a generated Spanish product catalog.

The real MeLi titles cannot be shipped, so `make demo` and the tests use this instead:
30 categories named like MeLi's, titles built from per-category nouns, brands and models plus
attributes that many categories share (colours, sizes, "kit", "original", "para auto"…),
with noise that real titles have: titles naming only a brand (brands overlap across
categories), typos, dropped accents, shouting, stray words from other categories, and a
little label noise. It is deterministic (same seed, same bytes) and small:
the files live in ``meli/resources/demo/`` and ``python -m meli.demo_catalog`` rewrites them.

It is a fixture for the pipeline, not a benchmark: accuracy on it says nothing about real data.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "resources" / "demo"

# category: (nouns, brands / models, category-specific attributes)
CATEGORIES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "DIAPER_BAGS": (["bolso maternal", "mochila pañalera", "bolso cambiador"], ["Baby Kits", "Chicco", "Mimo"], ["con cambiador", "térmico", "impermeable"]),
    "BABY_STROLLERS": (["cochecito", "coche de bebé", "carrito bebé"], ["Chicco", "Infanti", "Graco"], ["plegable", "paraguitas", "travel system"]),
    "DIAPERS": (["pañales", "pañal descartable", "pañales de tela"], ["Pampers", "Huggies", "Babysec"], ["talle g", "pack x 50", "recién nacido"]),
    "CELLPHONES": (["celular", "smartphone", "teléfono celular"], ["Samsung Galaxy A10", "Motorola G7", "Xiaomi Redmi Note 8"], ["32gb", "libre", "dual sim", "4g"]),
    "CELLPHONE_CASES": (["funda", "carcasa", "estuche"], ["iPhone 11", "Samsung A10", "Motorola G7"], ["silicona", "antigolpe", "transparente"]),
    "HEADPHONES": (["auriculares", "audífonos", "vincha auricular"], ["JBL T450", "Sony", "Xiaomi Airdots"], ["bluetooth", "inalámbricos", "manos libres"]),
    "NOTEBOOKS": (["notebook", "laptop", "netbook"], ["Lenovo Ideapad", "HP 240", "Dell Inspiron"], ["intel core i5", "8gb ram", "ssd 240gb", "15.6"]),
    "COMPUTER_MICE": (["mouse", "ratón óptico", "mouse gamer"], ["Logitech M170", "Genius", "Redragon"], ["inalámbrico", "usb", "dpi"]),
    "KEYBOARDS": (["teclado", "teclado gamer", "teclado mecánico"], ["Logitech K120", "Redragon Kumara", "Genius"], ["usb", "retroiluminado", "español"]),
    "MOTORCYCLE_HELMETS": (["casco", "casco moto", "casco rebatible"], ["Hawk", "LS2", "Vertigo"], ["integral", "certificado", "visor"]),
    "VEHICLE_BRAKE_DISCS": (["disco de freno", "par discos de freno", "disco freno"], ["Fremax", "Gol", "Corsa"], ["ventilado", "delantero", "trasero"]),
    "AUTOMOTIVE_HEADLIGHTS": (["óptica", "faro delantero", "farol"], ["Gol Trend", "Fiat Palio", "Ford Fiesta"], ["izquierda", "derecha", "led"]),
    "CAR_BATTERIES": (["batería", "bateria auto", "acumulador"], ["Moura", "Willard", "Bosch"], ["12v", "65 amp", "12x65"]),
    "WOMEN_SWIMWEAR": (["bikini", "malla enteriza", "traje de baño mujer"], ["Sweet Lady", "Marcela Koury"], ["push up", "tiro alto", "verano"]),
    "SNEAKERS": (["zapatillas", "tenis", "zapatillas running"], ["Nike Air Max", "Adidas Superstar", "Topper"], ["hombre", "mujer", "talle 42"]),
    "PANTS": (["pantalón", "jean", "pantalón cargo"], ["Levis 501", "Wrangler", "Kosiuko"], ["chupin", "elastizado", "tiro alto"]),
    "T_SHIRTS": (["remera", "camiseta", "remera manga corta"], ["Adidas", "Puma", "Kevingston"], ["algodón", "estampada", "hombre"]),
    "WRISTWATCHES": (["reloj", "reloj pulsera", "reloj smartwatch"], ["Casio", "Mistral", "Tommy Hilfiger"], ["sumergible", "acero", "cronógrafo"]),
    "SUNGLASSES": (["anteojos de sol", "lentes de sol", "gafas"], ["Ray Ban Aviator", "Oakley", "Vulk"], ["polarizados", "uv400", "espejados"]),
    "COFFEE_MAKERS": (["cafetera", "cafetera express", "máquina de café"], ["Oster", "Nespresso", "Philips"], ["cápsulas", "15 bar", "filtro"]),
    "BLENDERS": (["licuadora", "minipimer", "mixer"], ["Oster", "Philips", "Atma"], ["vaso de vidrio", "700w", "5 velocidades"]),
    "REFRIGERATORS": (["heladera", "refrigerador", "heladera con freezer"], ["Gafa", "Whirlpool", "Patrick"], ["no frost", "cíclica", "340 litros"]),
    "WASHING_MACHINES": (["lavarropas", "lavadora", "lavarropas automático"], ["Drean Next", "Electrolux", "Samsung"], ["carga frontal", "8 kilos", "1000 rpm"]),
    "AIR_CONDITIONERS": (["aire acondicionado", "split", "equipo de aire"], ["BGH", "Surrey", "Philco"], ["frío calor", "3000 frigorías", "inverter"]),
    "DRILLS": (["taladro", "taladro percutor", "atornillador"], ["Bosch GSB", "Black Decker", "Dewalt"], ["inalámbrico", "13mm", "650w"]),
    "ELECTRIC_PRESSURE_WASHERS": (["hidrolavadora", "lavadora a presión", "hidrolimpiadora"], ["Karcher K2", "Lavor One", "Gamma"], ["1700w", "120 bar", "con manguera"]),
    "SOUND_CARDS": (["placa de sonido", "interfaz de audio", "tarjeta de sonido"], ["Behringer UMC22", "Focusrite Scarlett", "Creative"], ["usb", "7.1", "xlr"]),
    "MICROCONTROLLERS": (["microcontrolador", "placa arduino", "chip"], ["Arduino Uno", "ESP8266", "Atmega328"], ["r3", "wifi", "smd"]),
    "FALSE_EYELASHES": (["pestañas postizas", "pestañas", "kit pestañas"], ["Mink", "Ardell", "Pink Up"], ["3d", "pelo a pelo", "naturales"]),
    "DOLLS": (["muñeca", "bebote", "muñeca articulada"], ["Barbie", "Cry Babies", "Baby Born"], ["con accesorios", "original", "juguete"]),
}

SHARED = ["kit", "original", "nuevo", "oferta", "envío gratis", "negro", "blanco", "rojo", "azul", "rosa",
          "grande", "mini", "pro", "x 2", "pack", "premium", "para auto", "para bebé", "usb", "garantía"]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.random()
    if kind < 0.4:
        return word[:i] + word[i + 1 :]  # dropped letter
    if kind < 0.8:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swapped letters
    return word[:i] + word[i] + word[i:]  # doubled letter


def _strip_accents(text: str) -> str:
    return text.translate(str.maketrans("áéíóúñÁÉÍÓÚÑ", "aeiounAEIOUN"))


def make_title(category: str, rng: random.Random) -> str:
    nouns, brands, attrs = CATEGORIES[category]
    # a quarter of the titles name no product, only a brand and attributes (as real sellers
    # do): brands overlap across categories, so these are genuinely ambiguous
    parts = [rng.choice(nouns)] if rng.random() < 0.75 else []
    if not parts or rng.random() < 0.8:
        parts.append(rng.choice(brands))
    parts += rng.sample(attrs, k=rng.randint(0, min(2, len(attrs))))
    parts += rng.sample(SHARED, k=rng.randint(0, 3))
    if rng.random() < 0.25:  # a stray word borrowed from another category
        other = CATEGORIES[rng.choice(list(CATEGORIES))]
        parts.append(rng.choice(other[rng.randrange(3)]))
    head, tail = parts[:1], parts[1:]
    rng.shuffle(tail)
    parts = head + tail
    words = " ".join(parts).split()
    words = [_typo(w, rng) if rng.random() < 0.08 else w for w in words]
    title = " ".join(words)
    if rng.random() < 0.3:
        title = _strip_accents(title)
    style = rng.random()
    if style < 0.6:
        title = title.title()
    elif style < 0.7:
        title = title.upper()
    return title


def generate(n_per_category: int, seed: int, label_noise: float = 0.02) -> list[dict]:
    rng = random.Random(seed)
    names = list(CATEGORIES)
    rows = []
    for category in names:
        for _ in range(n_per_category):
            title = make_title(category, rng)
            label = rng.choice(names) if rng.random() < label_noise else category
            rows.append({"title": title, "category": label, "language": "spanish", "label_quality": "reliable"})
    rng.shuffle(rows)
    return rows


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0))  # mtime=0: same rows, same bytes


def write_demo(folder: Path = DEMO_DIR) -> None:
    """(Re)write the embedded dataset: labelled train/validation and an unlabelled catalog."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(generate(100, seed=2019), folder / "train.jsonl.gz")
    write_jsonl_gz(generate(20, seed=2020, label_noise=0.0), folder / "validation.jsonl.gz")
    catalog = [{"id": i, "title": r["title"], "language": "spanish"} for i, r in enumerate(generate(40, seed=2021, label_noise=0.0))]
    catalog[7]["title"] = ""  # real catalogs have empty and missing titles
    catalog[11]["title"] = None
    write_jsonl_gz(catalog, folder / "catalog.jsonl.gz")


if __name__ == "__main__":
    write_demo()
    print(f"wrote {DEMO_DIR}")
