package kms

import (
	"strings"
)

// Key-name patterns use path.Match syntax: '*' is any run of characters,
// '?' one character, '[...]' a class ('^' negates, '-' ranges), '\' quotes.
// Key names never hold '/', so '*' and '?' match any name characters.
//
// PatternsContain decides exactly whether every key name that pattern p
// matches is matched by one of the patterns qs: the names form a regular
// language and so does each pattern's, so the question is answered by a
// search of the product of their automata for a name that p accepts and
// no q does. It is not a syntactic test: "team-a-[xy]*" is within
// ["team-a-x*", "team-a-y*"], and "*a" is not within "a*".

// nameAlphabet is every character a key name may hold (ValidateName).
const nameAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-"

// nameFirst is every character a key name may start with.
const nameFirst = "abcdefghijklmnopqrstuvwxyz0123456789"

// globToken is one step of a pattern: a set of characters (a bit per
// nameAlphabet index) taken once, or any number of times for a star.
type globToken struct {
	set  uint64
	star bool
}

// compileGlob turns a well-formed pattern (ValidatePatterns) into tokens
// over nameAlphabet. Characters outside the alphabet match no key name and
// so give an empty set.
func compileGlob(p string) []globToken {
	var out []globToken
	all := uint64(1)<<len(nameAlphabet) - 1
	bit := func(c byte) uint64 {
		if i := strings.IndexByte(nameAlphabet, c); i >= 0 {
			return 1 << i
		}
		return 0
	}
	for i := 0; i < len(p); i++ {
		switch c := p[i]; c {
		case '*':
			out = append(out, globToken{set: all, star: true})
		case '?':
			out = append(out, globToken{set: all})
		case '\\':
			i++
			if i < len(p) {
				out = append(out, globToken{set: bit(p[i])})
			}
		case '[':
			i++
			negate := false
			if i < len(p) && p[i] == '^' {
				negate = true
				i++
			}
			var set uint64
			for first := true; i < len(p) && (first || p[i] != ']'); first = false {
				lo := p[i]
				if lo == '\\' {
					i++
					lo = p[i]
				}
				i++
				hi := lo
				if i+1 < len(p) && p[i] == '-' && p[i+1] != ']' {
					hi = p[i+1]
					if hi == '\\' {
						i++
						hi = p[i+1]
					}
					i += 2
				}
				for j := 0; j < len(nameAlphabet); j++ {
					if c := nameAlphabet[j]; c >= lo && c <= hi {
						set |= 1 << j
					}
				}
			}
			if negate {
				set = all &^ set
			}
			out = append(out, globToken{set: set})
		default:
			out = append(out, globToken{set: bit(c)})
		}
	}
	return out
}

// nfaSet is a set of positions in a pattern's tokens (position len(tokens)
// accepts). Patterns are at most 128 characters, so 129 positions.
type nfaSet [3]uint64

func (s *nfaSet) add(i int)         { s[i/64] |= 1 << (i % 64) }
func (s nfaSet) has(i int) bool     { return s[i/64]&(1<<(i%64)) != 0 }
func (s nfaSet) empty() bool        { return s == nfaSet{} }
func (s nfaSet) accepts(n int) bool { return s.has(n) }
func (s nfaSet) key(b *strings.Builder) {
	for _, w := range s {
		for k := 0; k < 8; k++ {
			b.WriteByte(byte(w >> (8 * k)))
		}
	}
}

// closure adds the positions after stars, which match the empty run.
func closure(toks []globToken, s nfaSet) nfaSet {
	for i := 0; i < len(toks); i++ {
		if s.has(i) && toks[i].star {
			s.add(i + 1)
		}
	}
	return s
}

// step moves every position of s over the character with index c.
func step(toks []globToken, s nfaSet, c int) nfaSet {
	var out nfaSet
	for i := 0; i < len(toks); i++ {
		if !s.has(i) || toks[i].set&(1<<c) == 0 {
			continue
		}
		if toks[i].star {
			out.add(i)
		} else {
			out.add(i + 1)
		}
	}
	return closure(toks, out)
}

// maxContainStates bounds the search; past it the answer is "not shown to
// be contained", which refuses (the safe side).
const maxContainStates = 20000

// PatternsContain reports whether every key name matched by p is matched by
// at least one of qs. A false answer comes with an example name p matches
// and no q does, when one was found ("" if the search hit its bound).
func PatternsContain(qs []string, p string) (bool, string) {
	pt := compileGlob(p)
	qt := make([][]globToken, len(qs))
	for i, q := range qs {
		qt[i] = compileGlob(q)
	}
	type state struct {
		p    nfaSet
		qs   []nfaSet
		name string
	}
	start := state{p: closure(pt, nfaSet{}.with(0))}
	for i := range qt {
		start.qs = append(start.qs, closure(qt[i], nfaSet{}.with(0)))
	}
	// A state is queued once (seen when queued, not when taken), so the
	// queue never holds more than maxContainStates.
	key := func(st state) string {
		var kb strings.Builder
		st.p.key(&kb)
		for _, q := range st.qs {
			q.key(&kb)
		}
		// The empty name is not a key name: acceptance counts after one
		// character at least.
		kb.WriteByte(map[bool]byte{true: 1, false: 0}[st.name == ""])
		return kb.String()
	}
	seen := map[string]bool{key(start): true}
	queue := []state{start}
	for len(queue) > 0 {
		st := queue[0]
		queue = queue[1:]
		first := st.name == ""
		if !first && st.p.accepts(len(pt)) {
			covered := false
			for i, q := range st.qs {
				if q.accepts(len(qt[i])) {
					covered = true
					break
				}
			}
			if !covered {
				return false, st.name
			}
		}
		alphabet := nameAlphabet
		if first {
			alphabet = nameFirst
		}
		for j := 0; j < len(alphabet); j++ {
			c := strings.IndexByte(nameAlphabet, alphabet[j])
			np := step(pt, st.p, c)
			if np.empty() {
				continue
			}
			next := state{p: np, qs: make([]nfaSet, len(qt)), name: st.name + string(alphabet[j])}
			for i := range qt {
				next.qs[i] = step(qt[i], st.qs[i], c)
			}
			k := key(next)
			if seen[k] {
				continue
			}
			seen[k] = true
			if len(seen) > maxContainStates {
				return false, ""
			}
			queue = append(queue, next)
		}
	}
	return true, ""
}

func (s nfaSet) with(i int) nfaSet {
	s.add(i)
	return s
}
