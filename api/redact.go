package api

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// Input that fails validation is never echoed or recorded as it is: a
// bearer token pasted into a path must not reach an error body, the log,
// the SIEM stream or the audit record. It is shown as "~" and a short hash
// instead, enough to correlate without revealing.

// redacted names a value by a short hash of it.
func redacted(s string) string {
	h := sha256.Sum256([]byte(s))
	return "~" + hex.EncodeToString(h[:6])
}

// safeSegment reports whether a path segment may be shown as it is: the
// characters and length of a key name, a version, a token id or a digest.
func safeSegment(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// safePath is the request path with every segment that is not safe to show
// replaced by its short hash, and at most 16 segments.
func safePath(p string) string {
	segs := strings.Split(p, "/")
	if len(segs) > 16 {
		segs = append(segs[:16], "...")
	}
	for i, s := range segs {
		if s != "" && s != "..." && !safeSegment(s) {
			segs[i] = redacted(s)
		}
	}
	return strings.Join(segs, "/")
}

// recordedName is how a key name from a path is recorded: as it is when it
// is a valid name, else as its short hash.
func recordedName(name string) string {
	if name == "" || safeSegment(name) {
		return name
	}
	return redacted(name)
}

// maxDepth bounds the nesting of a JSON body. The API's deepest document (a
// policy with a parameters literal) nests 4 levels; the check runs on the
// raw bytes before any decoder allocates per level.
const maxDepth = 16

// jsonDepthOK reports whether b nests objects and arrays at most maxDepth
// deep (strings skipped, escapes honoured).
func jsonDepthOK(b []byte) bool {
	depth, inString := 0, false
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
			if depth > maxDepth {
				return false
			}
		case '}', ']':
			depth--
		}
	}
	return true
}
