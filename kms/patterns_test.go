package kms

import (
	"math/rand/v2"
	"path"
	"testing"
)

func TestPatternsContainTable(t *testing.T) {
	cases := []struct {
		qs   []string
		p    string
		want bool
	}{
		{[]string{"*"}, "*", true},
		{[]string{"*"}, "team-a-*", true},
		{[]string{"*"}, "[^a]?", true},
		{[]string{"team-a-*"}, "*", false}, // the review's escalation
		{[]string{"team-a-*"}, "team-a-*", true},
		{[]string{"team-a-*"}, "team-a-x", true},
		{[]string{"team-a-*"}, "team-a-x*", true},
		{[]string{"team-a-*"}, "team-a*", false}, // matches team-ab
		{[]string{"team-a-*"}, "team-?-*", false},
		{[]string{"team-a-*"}, "team-b-*", false},
		{[]string{"team-a-*"}, "*team-a-*", false},
		{[]string{"team-a-*"}, "team-a-", true}, // one name; '*' matches the empty run
		{[]string{"team-a-x*", "team-a-y*"}, "team-a-[xy]*", true},
		{[]string{"team-a-x*", "team-a-y*"}, "team-a-[xyz]*", false},
		{[]string{"team-a-x*"}, "team-a-[^y]*", false},
		{[]string{"a*"}, "*a", false},
		{[]string{"*a"}, "*a", true},
		{[]string{"*a"}, "b*a", true},
		{[]string{"*a*"}, "a*", true},
		{[]string{"*a*"}, "?a?", true},
		{[]string{"?"}, "[a-z]", true},
		{[]string{"[a-m]*", "[n-z]*", "[0-9]*"}, "*", true}, // names start with a letter or digit
		{[]string{"[a-m]*", "[n-z]*"}, "*", false},
		{[]string{"k"}, "k", true},
		{[]string{"k"}, "K", true},   // matches no key name: vacuously within
		{[]string{"k"}, "a/b", true}, // likewise
		{[]string{"k1"}, "k?", false},
		{[]string{"k\\*"}, "k\\*", true},
		{[]string{"k*"}, "k\\.", true},
		{[]string{"?*"}, "*", true},
		{[]string{"??*"}, "*", false},
	}
	for _, c := range cases {
		want := c.want
		got, example := PatternsContain(c.qs, c.p)
		if got != want {
			t.Errorf("PatternsContain(%q, %q) = %v (example %q), want %v", c.qs, c.p, got, example, want)
		}
		if !got && example != "" {
			if ok, _ := path.Match(c.p, example); !ok || ValidateName(example) != nil {
				t.Errorf("%q: example %q is not a name the pattern matches", c.p, example)
			}
			for _, q := range c.qs {
				if ok, _ := path.Match(q, example); ok {
					t.Errorf("%q: example %q is matched by %q", c.p, example, q)
				}
			}
		}
	}
}

// TestPatternsContainAgreesWithPathMatch checks the decision against
// path.Match on every name of up to three characters over a small alphabet,
// for random patterns: "contained" must never be said of a pattern that
// matches a name no q matches, and "not contained" must come with a true
// example.
func TestPatternsContainAgreesWithPathMatch(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	alpha := []string{"a", "b", "-", "*", "?", "[ab]", "[^a]", "[a-b]"}
	gen := func() string {
		n := 1 + r.IntN(4)
		s := ""
		for i := 0; i < n; i++ {
			s += alpha[r.IntN(len(alpha))]
		}
		return s
	}
	var names []string
	var walk func(prefix string)
	walk = func(prefix string) {
		if len(prefix) > 0 && ValidateName(prefix) == nil {
			names = append(names, prefix)
		}
		if len(prefix) == 4 {
			return
		}
		for _, c := range []string{"a", "b", "c", "-"} {
			walk(prefix + c)
		}
	}
	walk("")
	for i := 0; i < 3000; i++ {
		qs := []string{gen()}
		if r.IntN(2) == 0 {
			qs = append(qs, gen())
		}
		p := gen()
		got, example := PatternsContain(qs, p)
		for _, n := range names {
			pm, _ := path.Match(p, n)
			if !pm {
				continue
			}
			qm := false
			for _, q := range qs {
				if ok, _ := path.Match(q, n); ok {
					qm = true
				}
			}
			if got && !qm {
				t.Fatalf("PatternsContain(%q, %q) = true, but %q matches p and no q", qs, p, n)
			}
		}
		if !got {
			if example == "" {
				t.Fatalf("PatternsContain(%q, %q): no example", qs, p)
			}
			if ok, _ := path.Match(p, example); !ok {
				t.Fatalf("PatternsContain(%q, %q): example %q not matched by p", qs, p, example)
			}
			for _, q := range qs {
				if ok, _ := path.Match(q, example); ok {
					t.Fatalf("PatternsContain(%q, %q): example %q matched by %q", qs, p, example, q)
				}
			}
		}
	}
}
