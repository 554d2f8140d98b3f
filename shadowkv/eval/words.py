"""Word lists and seeded random items (numbers, uuids, word keys) for the synthetic tasks.

The lists are written for this project (common English words, no external corpus). RULER draws
from wonderwords' much larger lists; only the *kind* of item matters for the benchmark, so a few
hundred words per part of speech suffice: word keys are `adjective-noun` pairs (about 100K
combinations), and the common-words task tops its pool up with pronounceable pseudo-words when a
long context needs more distinct words than we list.
"""

from __future__ import annotations

import random
import uuid

NOUNS: tuple[str, ...] = tuple(sorted(set("""
    acorn actor airport album anchor angle animal ankle answer apple apron arch arena arm army
    arrow artist atlas attic author avenue award axe baby backpack badge bag bakery balcony ball
    balloon banana band bank barn barrel basket bath battery beach beacon beam bean bear beard bed
    bee bell belt bench berry bicycle bird blanket blossom boat body bolt bone book boot bottle
    boulder bowl box branch bread brick bridge broom brother brush bubble bucket buffalo building
    bulb bus butter button cabin cable cactus cafe cake camel camera camp canal candle canoe canvas
    canyon cap captain car card carpet carrot cart castle cat cave ceiling cellar chair chalk
    channel chapter cheese cherry chest chicken chimney church circle city cliff clock cloud coat
    coconut coffee coin collar comet compass cookie copper corn corner cottage cotton country cousin
    cow crab crane crayon creek cricket crown cup curtain cushion daisy dancer desert desk diamond
    dinner doctor dog doll dolphin donkey door dragon drawer dream dress drum duck eagle ear earth
    egg elbow elephant elevator engine envelope eraser face factory falcon farm farmer feather
    fence field finger fire fish flag flame flute fog folder forest fork fountain fox frame frog
    fruit funnel garage garden gate giant ginger giraffe glass glove goat gold grape grass guitar
    hammer hand harbor harp hat hawk heart helmet hill hive holiday honey hook horizon horse
    hospital hotel house iceberg island ivory jacket jar jewel judge jungle kettle key kingdom
    kitchen kite kitten knee knife ladder lake lamp lantern lemon letter library lighthouse lily
    lion lizard lobster lock locket magnet mango map marble market mask meadow melon mirror monkey
    moon mountain mouse museum needle nest net notebook novel oak ocean office olive onion orange
    orchard otter owl oyster paddle page painter palace panda paper parade parrot pasta path peach
    pear pebble pencil penguin pepper piano pickle picture pillow pilot pine pipe planet plate
    pocket poem pond poppy potato pumpkin puppet puzzle queen quilt rabbit radio rainbow raven
    recipe ribbon river road robot rocket roof rose ruby saddle sailor salad sand saucer scarf
    school scissors sea seal seed shadow shark sheep shelf shell ship shoe shovel singer sister
    skate sky sled snail snake soap sock sofa soldier spider spoon squirrel stable stair star
    statue stone storm stove stream street sugar suitcase sun swan sweater table tail teacher
    teapot telescope temple tent thread throne ticket tiger timber toast tomato tower town toy
    tractor train tree trophy truck trumpet tulip tunnel turkey turtle umbrella valley vase
    village violin volcano wagon wallet walnut warden watch water wave whale wheel whistle window
    wing wizard wolf worm yacht zebra
""".split())))

ADJECTIVES: tuple[str, ...] = tuple(sorted(set("""
    able absent acidic active agile alert amber ancient angry anxious aquatic arctic ardent
    armored awake bald barren basic bitter black bland blank blue bold bony brave breezy brief
    bright brisk broad bronze brown bumpy busy calm candid careful casual cheap cheerful chilly
    civil clean clever cloudy clumsy coastal cold common cosmic cozy crisp crooked cruel curious
    curly damp dark dear deep dense direct distant dizzy dry dull dusty eager early easy elder
    elegant empty endless equal exact faint fair faithful famous fancy fast fierce final fine
    firm flat fluffy foggy fond formal fragile frank free fresh friendly frosty frozen full funny
    fuzzy gentle giant gifted glad gloomy glossy golden good graceful grand grateful gray great
    green grumpy happy hardy harsh hasty healthy heavy hidden hollow honest hot huge humble hungry
    icy idle jolly joyful juicy keen kind large late lazy lean legal light little lively local
    lonely long loud lovely loyal lucky lunar magic major marine mellow merry mighty mild misty
    modern modest moist narrow neat nervous new nimble noble noisy normal odd old open orderly
    pale patient peaceful perfect plain pleasant plucky polite poor precious pretty proud purple
    quick quiet radiant rapid rare ready real red regal rich rigid ripe robust rocky rosy rough
    round royal rural rusty sacred salty sandy scarlet secret serene shallow sharp shiny short shy
    silent silky silver simple sleepy slim slow small smart smooth snowy soft solar solid sour
    spare spicy splendid square stable steady steep sticky still stormy stout strange strict
    strong sturdy sunny super sweet swift tall tame tender thick thin thirsty tidy tiny tired
    tough tranquil tropical true upbeat urban usual vast velvet violet vivid warm wary wavy weary
    wet white whole wide wild windy wise witty wooden woolly yellow young zealous
""".split())))

VERBS: tuple[str, ...] = tuple(sorted(set("""
    accept achieve add admire admit adopt advise agree allow amuse announce appear applaud
    arrange arrive ask attach attend avoid bake balance bang bathe battle beg behave belong bless
    blink boil borrow bounce breathe bring build bump burn bury buzz calculate call carry carve
    catch change charge chase cheer chew choose clap climb close coach collect comb command
    compare complain confess connect consider cook copy count cover crawl cross crush cry cycle
    dance decide deliver depend describe design destroy develop dig discover dive divide drag
    draw drift drink drive drop dust earn eat educate embrace employ enjoy enter escape examine
    excite expand explain explore fasten fetch fill find finish fit fix flap float flow fly fold
    follow forgive freeze frighten gather gaze glide glow grab greet grin grow guard guess guide
    hang happen harvest hatch heal hear help hide hike hop hope hover hug hum hunt hurry imagine
    improve include inform inspect invent invite jog join joke juggle jump kick kneel knit knock
    know land laugh launch lead learn lend lift listen live load look love manage march measure
    melt mend mix move nail nod notice obey observe offer open order own pack paddle paint park
    pass paste pause peel perform pick plant play plead polish pour pray preach prefer prepare
    print promise protect pull pump punch push race rain reach read receive record reflect relax
    remain remember repair repeat reply rescue rest return ride ring rinse roar roll rub run rush
    sail save scatter scream search settle sew shake share shine shiver shout sing sip sketch ski
    skip sleep slide smile sneeze sniff snore solve sort sparkle speak spell spin splash spray
    squeeze stamp stare start stay steer stir stitch stretch study suggest supply surprise
    swallow sweep swim swing talk taste teach tease tell thank throw tickle tie toss touch trace
    trade travel treat tremble trot trust try tumble turn twist type unlock unpack vanish visit
    wait walk wander want warn wash watch wave weave whisper whistle wiggle win wink wish wonder
    work worry wrap write yawn yell zoom
""".split())))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def word_pool() -> list[str]:
    """Sorted, de-duplicated union of nouns, adjectives and verbs (RULER's cwe pool, our lists)."""
    return sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    """Uniform integer with exactly `num_digits` digits, as a string."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_uuid(rng: random.Random) -> str:
    """UUID4 string built from 128 seeded random bits (version and variant bits forced)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_word_key(rng: random.Random) -> str:
    """An `adjective-noun` key, e.g. `misty-lantern`."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_letters(rng: random.Random, length: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def pseudo_words(rng: random.Random, count: int, exclude: set[str] | frozenset[str]) -> list[str]:
    """`count` distinct pronounceable three-syllable non-words (`bakoti`), none in `exclude`."""
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words
