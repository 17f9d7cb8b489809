// Every Thrift type, for the JSON codec's round trips.
include "../../thrift/base.thrift"

typedef i64 Millis
typedef list<string> Names

enum Color {
    RED = 1,
    GREEN,
    BLUE = 10,
}

struct Inner {
    1: required string name,
    2: optional Millis at,
}

union Choice {
    1: string text,
    2: i32 number,
    3: Inner inner,
}

struct All {
    1: required bool b,
    2: required byte i8v,
    3: required i16 i16v,
    4: required i32 i32v,
    5: required i64 i64v,
    6: required double d,
    7: required string s,
    8: optional binary bin,
    9: optional Color color,
    10: optional list<i32> ints,
    11: optional set<string> tags,
    12: optional map<string, Inner> by_name,
    13: optional map<i32, list<Names>> by_number,
    14: optional list<map<Color, set<i64>>> deep,
    15: optional Inner inner,
    16: optional Choice choice,
    17: optional base.Meta meta,
    18: string plain,
    19: optional All child,
    // A field id more than 15 past the one before (Compact's long field header), and a list
    // of more than 14 bools (Compact's long list header; bools in a container).
    40: optional list<bool> flags,
}

exception Oops {
    1: required i32 code,
    2: optional string why,
}

service Types {
    All Roundtrip(1: All all) throws (1: Oops oops),
    void Nothing(),
    i64 Two(1: i32 a, 2: string b),
    // A queue trigger's raw payload: the message bytes as the only argument.
    i64 Raw(1: binary data),
}

service MoreTypes extends Types {
    Inner More(1: Inner inner),
}
