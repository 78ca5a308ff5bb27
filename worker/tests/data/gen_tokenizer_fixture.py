"""Expected CLIP token ids for worker/tests/tokenizer_clip.rs, from the real open_clip.tokenize.

Run: /work/main/.venv-bench/bin/python worker/tests/data/gen_tokenizer_fixture.py
Writes worker/tests/data/tokenizer_clip.json (committed).
"""
import json
import os

import ftfy
import open_clip

LONG = " ".join(["a very long caption about a dog on a beach at sunset"] * 12)

CAPTIONS = [
    "",
    "   ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "Hello, World! How's it going?? ... (yes) [no] {maybe} -- ok;",
    "it's they're we've I'm you'll he'd can't won't",
    "Café crème brûlée à la carte, naïve façade, Ångström, Øresund, straße",
    "e\u0301te\u0301 (combining accents)",
    "emoji 😀🎉👍🏽 and family 👨\u200d👩\u200d👧 and flag 🇫🇷",
    LONG,
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &eacute;t&eacute; &nbsp;x",
    "double &amp;amp; escaped &amp;lt;tag&amp;gt;",
    "legacy &amp without semicolon and &notit; and &#x41;&#66;",
    "<b>bold</b> &amp; stays escaped once",
    "multiple    spaces\t\ttabs\n\nnewlines\r\n crlf",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "中文标题：一只猫坐在垫子上。",
    "日本語のキャプション、東京タワー",
    "한국어 캡션 테스트",
    "Ελληνικά ΟΔΟΣ και σίσυφος",
    "Русский текст, ёлка",
    "العربية نص",
    "हिन्दी पाठ",
    "“curly quotes” and ‘single’ ones",
    "ﬁne ﬂowers (ligatures)",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３",
    "numbers 12345 3.14159 1,000,000 2nd 3rd",
    "url https://example.com/path?q=1&x=2 #hashtag @user",
    "İstanbul DİYARBAKIR",
    "zero\u200bwidth\u200dspace and soft\u00adhyphen",
    "\u00a0non breaking\u00a0spaces\u2003em space",
    "<start_of_text> literal specials <end_of_text>",
    "under_score snake_case CamelCase",
    "!!!???...,,,;;;:::",
    "x" * 300,
    "control\x07chars\x1b[31mred\x1b[0m here",
    "a\u2028line\u2029separators",
    "𝒥ohn 𝔘nicode math",
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    cases = []
    for ctx in (77, 16):
        for text in CAPTIONS:
            if ctx == 16 and len(text) < 20:
                continue
            # Mojibake repair (ftfy fix_encoding) is the one ftfy step the Rust side skips;
            # no case here may depend on it, or the fixture would test the wrong thing.
            assert ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False), text
            ids = open_clip.tokenize([text], context_length=ctx)[0].tolist()
            cases.append({"text": text, "context_length": ctx, "ids": ids})
    out = os.path.join(here, "tokenizer_clip.json")
    with open(out, "w", encoding="utf-8") as f:
        # One case per line keeps the committed file readable and its diffs small.
        head = {"open_clip": open_clip.__version__, "ftfy": ftfy.__version__}
        f.write(json.dumps(head)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
