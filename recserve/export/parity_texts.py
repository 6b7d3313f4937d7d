"""The built-in texts of the parity gate (no torch needed).

The parity texts cover what a served encoder meets in practice and what breaks exports: empty and
whitespace-only strings, single characters, catalogue titles and queries, long documents past any max length
(so truncation is exercised), non-Latin scripts, emoji (ZWJ sequences and flags included), markup, code and
odd Unicode. They are interleaved so that any run of 32 texts mixes lengths, which the batch-invariance
check needs. The server's end-to-end tests reuse them.
"""

from __future__ import annotations

import functools
import itertools

_EDGE = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    " \n\t \r\n ",
    "\u00a0",
    "\u200b",
    "a",
    "I",
    "?",
    "!!!",
    "42",
    "ok",
    "x",
    ".",
    "[CLS]",
    "[SEP] [PAD] [MASK]",
    "<s></s>",
    "N/A",
]

_SHORT = [
    "wireless headphones",
    "running shoes for men",
    "cheap flights to lisbon",
    "vegan lasagna recipe",
    "iphone 15 case",
    "4k monitor 27 inch",
    "jazz for studying",
    "sci-fi books like dune",
    "kids bike 16in",
    "best espresso machine under $300",
    "how to fix a leaking tap",
    "noise cancelling earbuds",
    "USB-C to HDMI adapter",
    "organic green tea 100 bags",
    "yoga mat non slip",
    "thriller movies 2023",
    "hotel near eiffel tower",
    "gift ideas for dad",
    "gaming chair ergonomic",
    "LEGO Technic set",
]

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "User watched three documentaries about deep-sea creatures this week and skipped every comedy.",
    "Lightweight trail running shoe with a breathable mesh upper and a grippy rubber outsole.",
    "A slow-burning mystery set in a small Norwegian fishing village during the polar night.",
    "Customers who bought this also bought a stainless steel water bottle and a cork yoga block.",
    "Recently viewed: mechanical keyboard, wrist rest, desk lamp with wireless charger.",
    "She prefers short podcasts about economics, usually listened to on the morning commute.",
    "Limited edition vinyl pressing, remastered from the original analogue tapes, 180 g.",
    "Is this dishwasher safe? The description does not say and the reviews disagree.",
    "Return window is 30 days; items must be unused and in their original packaging.",
    "Great product!!! Arrived early, works perfectly, would buy again 10/10",
    "terrible. broke after two days. do NOT recommend",
    "Compare: 256 GB vs 512 GB storage — is the upgrade worth €120?",
    "Rated 4.6 out of 5 by 12,394 customers; 87% would recommend it to a friend.",
    "Playlist: lo-fi beats, rainy-day acoustic covers, and a little bossa nova.",
    "Dear customer, your order #A-2291-XZ has shipped and will arrive on Tuesday.",
    "Why do cats knock things off tables? A short guide for confused owners.",
    "Set of 6 ceramic mugs, hand-glazed, microwave safe, assorted earth tones.",
    "The user is a 34-year-old cyclist who reads long-form journalism on weekends.",
    "Breaking: central bank holds rates steady, signals two cuts later this year.",
]

_SCRIPTS = [
    "無線イヤホン ノイズキャンセリング",
    "東京で一番おいしいラーメン屋はどこですか？",
    "我想买一台轻薄的笔记本电脑，预算五千元左右。",
    "推荐一些适合周末看的科幻电影",
    "무선 이어폰 추천해 주세요",
    "오늘 저녁 메뉴로 김치찌개 어때요?",
    "أفضل هاتف ذكي بسعر معقول",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "שלום עולם, מה שלומך?",
    "नमस्ते, आप कैसे हैं?",
    "सस्ते जूते ऑनलाइन खरीदें",
    "Привет, мир! Как дела?",
    "Беспроводные наушники с шумоподавлением",
    "Γειά σου Κόσμε, τι κάνεις;",
    "สวัสดีครับ ยินดีต้อนรับ",
    "Xin chào thế giới, hôm nay bạn thế nào?",
    "Merhaba dünya, bugün nasılsın?",
    "Բարեւ աշխարհ",
    "გამარჯობა მსოფლიო",
    "ሰላም ልዑል",
    "வணக்கம் உலகம்",
    "হ্যালো বিশ্ব",
    "Ẓ̌ḁ̈l̷g̶o̵ t̸e̷x̶t̵",
    "Zürich café naïve façade jalapeño smörgåsbord",
]

_EMOJI = [
    "😀",
    "🔥🔥🔥",
    "🎧 wireless headphones 🔥 50% off",
    "👩‍👩‍👧‍👦 family pack",
    "🇯🇵 🇫🇷 🇧🇷 travel deals",
    "I ❤️ this song 🎶🎶",
    "👍🏽👍🏿 thumbs up",
    "🍕 + 🍺 = 😍",
    "best gift ever!!! 🎁🎉🥳",
    "☕️ morning ☀️ routine 🧘‍♀️",
    "🐶🐱🐭🐹🐰🦊🐻🐼🐨🐯🦁🐮",
    "rating: ⭐⭐⭐⭐☆",
]

_MIXED = [
    "https://example.com/products/12345?ref=home&utm_source=newsletter",
    "contact: support@example.org / +1 (555) 010-2398",
    "<div class='title'>Summer <b>Sale</b> &amp; more</div>",
    'def embed(texts): return model.encode(texts, normalize=True)  # "fast"',
    "SELECT * FROM items WHERE price < 20 ORDER BY rating DESC;",
    '{"user_id": 991, "clicked": [3, 17, 42], "dwell_ms": 5320}',
    "SKU: 8-MX-00123-B | Colour: midnight blue | Size: XL",
    "iPhone 15 Pro Max 256GB – Titanium Blue (Unlocked) 📱",
    "東京 Tokyo トーキョー 2024 travel guide ✈️",
    "Résumé of the café's crème brûlée — très bien!",
    "1+1=2; e^(iπ)+1=0; ∑ n² ≈ ∞",
    "C'est la vie — 人生就是这样 — такова жизнь — 🤷",
    "line one\nline two\n\nline four",
    "tabs\tbetween\twords",
    "MiXeD CaSe ShOuTiNg AnD whispering",
    "soft\u00adhyphen and zero\u200bwidth and non\u00a0breaking",
    "a" * 50,
    "word " * 40,
    "!!!???...,,,;;;:::---___",
    "0123456789 " * 12,
]

_PARAGRAPH = (
    "Our recommendation service ranks millions of items for every visitor, so the encoder that turns a "
    "product description into a vector runs far more often than any other model in the stack. This item is "
    "a handcrafted oak dining table with a natural oil finish, seating six people comfortably, delivered "
    "flat-packed with every tool needed for assembly. Reviewers praise its sturdiness and the warmth of the "
    "grain, while a few mention that the legs arrived slightly scratched. "
)


def _long_texts() -> list[str]:
    # Each is well past 256 word-piece tokens; the last ones are past 512, beyond any BERT position table.
    longs = [
        _PARAGRAPH * 3,
        _PARAGRAPH * 6,
        " ".join(_SENTENCES) * 2,
        " ".join(_SCRIPTS) * 2,
        " ".join(_EMOJI) * 4,
        " ".join(_MIXED[:12]) * 3,
        "token " * 600,
        "東京は日本の首都です。" * 120,
        (_PARAGRAPH + " ".join(_SCRIPTS[:6]) + " 🎧🔥 ") * 4,
        "A" + " b" * 1000,
    ]
    return longs


def _generated(n: int) -> list[str]:
    # Catalogue-like titles and queries built from small vocabularies, deterministic and varied in length.
    adjectives = ["compact", "premium", "vintage", "eco-friendly", "waterproof", "smart", "handmade"]
    things = [
        "backpack",
        "desk lamp",
        "coffee grinder",
        "sneakers",
        "novel",
        "headset",
        "tent",
        "teapot",
        "phone charger",
        "winter jacket",
        "board game",
    ]
    extras = [
        "",
        " with free shipping",
        " for travel and everyday use, available in four colours",
        " (2 pack)",
        " — bestseller in Home & Kitchen",
        " 限定版",
        " ✨",
        ", compatible with most devices, includes a two-year warranty and a carrying pouch",
    ]
    out = []
    for i, (adj, thing) in enumerate(itertools.product(adjectives, things)):
        out.append(f"{adj} {thing}{extras[i % len(extras)]}")
        if len(out) == n:
            break
    return out


def _generated_queries() -> list[str]:
    # Short search queries with typos, numbers and mixed languages, as users type them.
    return [
        "headphnoes wireles",
        "shoes size 44 eu",
        "pizza near me open now",
        "cadeau anniversaire femme 40 ans",
        "regalo para mamá",
        "usb c kabel 2m",
        "macbook air m2 vs m3",
        "книги фэнтези",
        "相机 推荐",
        "kpop albums",
        "how 2 cook rice",
        "cheap",
        "the",
        "alexa play something relaxing",
        "??? help",
        "order 99812 status",
    ]


def _interleave(groups: list[list[str]]) -> list[str]:
    # Round-robin over the groups so every window of the list mixes lengths and kinds of text.
    out: list[str] = []
    for row in itertools.zip_longest(*groups):
        out.extend(t for t in row if t is not None)
    return out


@functools.cache
def _parity() -> tuple[str, ...]:
    groups = [
        _EDGE,
        _SHORT,
        _SENTENCES,
        _SCRIPTS,
        _EMOJI,
        _MIXED,
        _long_texts(),
        _generated(60),
        _generated_queries(),
    ]
    return tuple(_interleave(groups))


def parity_texts() -> list[str]:
    """The gate's texts (at least 200), in a fixed order that mixes short, long and empty ones."""
    return list(_parity())


def parity_pairs() -> list[tuple[str, str]]:
    """(query, item) pairs for cross-encoders: each parity text paired with another, including empty ones."""
    texts = _parity()
    n = len(texts)
    return [(texts[i], texts[(i * 7 + 3) % n]) for i in range(n)]
