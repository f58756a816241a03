package layout

import "testing"

func TestPaths(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{TilePath(0, 0, 0), "tile/0/000"},
		{TilePath(4, 1234067, 8), "tile/4/x001/x234/067.p/8"},
		{TilePath(1, 1000, 256), "tile/1/x001/000"},
		{EntriesPath(1234067, 0), "tile/entries/x001/x234/067"},
		{EntriesPath(5, 255), "tile/entries/005.p/255"},
	} {
		if c.got != c.want {
			t.Errorf("%s, want %s", c.got, c.want)
		}
	}
	// The spec's example: a tree of 70,000 entries has 273 full level-0
	// tiles and a partial one of 112, one full level-1 tile and a partial
	// one of 17, and a partial level-2 tile of 1.
	if FullTiles(70000, 0) != 273 || PartialWidth(70000, 0) != 112 || FullTiles(70000, 1) != 1 || PartialWidth(70000, 1) != 17 || FullTiles(70000, 2) != 0 || PartialWidth(70000, 2) != 1 {
		t.Fatal("70,000 entries are not tiled as the spec says")
	}
	if FullTiles(256, 0) != 1 || PartialWidth(256, 0) != 0 || PartialWidth(256, 1) != 1 {
		t.Fatal("256 entries")
	}
}

func TestParseAcceptsOnlyWhatItWrites(t *testing.T) {
	for _, p := range []string{"checkpoint", "tile/0/000", "tile/63/x001/x234/067.p/8", "tile/entries/x018/x446/x744/x073/x709/x551/615"} {
		r, err := Parse(p)
		if err != nil || r.Path() != p {
			t.Errorf("%s: %+v %v", p, r, err)
		}
	}
	for _, p := range []string{"", "/checkpoint", "tile/", "tile/0", "tile/00/000", "tile/64/000", "tile/-1/000", "tile/0/0", "tile/0/0000",
		"tile/0/x000/001", "tile/0/001.p/0", "tile/0/001.p/256", "tile/0/001.p/08", "tile/0/../000", "tile/0/000/", "tile/entries/abc",
		"tile/0/x018/x446/x744/x073/x709/x551/616", "tile/0/x999/x999/x999/x999/x999/x999/999", "tile/1/000.p/1/x"} {
		if r, err := Parse(p); err == nil {
			t.Errorf("%q parsed as %+v", p, r)
		}
	}
}
