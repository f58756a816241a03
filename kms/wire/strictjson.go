package wire

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxJSONDepth is how deeply CheckJSON lets objects and arrays nest.
const MaxJSONDepth = 32

// JSONRules are what a body's schema says beyond its Go type.
type JSONRules struct {
	// Binary names the base64 fields: a string that does not decode, or an
	// array (encoding/json takes an array of numbers for []byte), is
	// refused.
	Binary map[string]bool
	// Free names the fields whose value is a document with field names of
	// its own (a Lattigo parameters literal): inside, names are not
	// checked against the API's, nor Binary and Min applied.
	Free map[string]bool
	// Min is the least value of number fields whose zero the Go types
	// cannot tell from "absent".
	Min map[string]float64
}

// CheckJSON refuses what encoding/json would quietly accept in a body whose
// field names are all a-z, 0-9 and _ (PlainKey): a duplicate key in any
// object (the last would win), any other key (encoding/json folds case,
// and with it 'ſ' to 's' and the Kelvin sign to 'k', so that "ſcale" would
// set scale), nesting deeper than MaxJSONDepth, anything after the first
// value, and what rules forbid. Its error says which, without echoing more
// than 40 bytes of a key.
func CheckJSON(b []byte, rules JSONRules) error {
	type frame struct {
		object    bool
		expectKey bool
		free      bool
		keys      map[string]bool
		lastKey   string
	}
	var stack []*frame
	done := func() {
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].expectKey = true
		}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	values := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if values == 0 {
				return errors.New("empty body")
			}
			return nil
		}
		var syn *json.SyntaxError
		switch {
		case errors.As(err, &syn):
			return fmt.Errorf("malformed JSON at byte %d", syn.Offset)
		case errors.Is(err, io.ErrUnexpectedEOF):
			return errors.New("truncated JSON")
		case err != nil:
			return errors.New("malformed JSON")
		}
		if len(stack) == 0 {
			if values > 0 {
				return errors.New("unexpected data after the JSON value")
			}
			values++
		}
		if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].expectKey {
			top := stack[n-1]
			if tok == json.Delim('}') {
				stack = stack[:n-1]
				done()
				continue
			}
			k, _ := tok.(string)
			if len(k) > 40 {
				k = k[:40] + "..."
			}
			if top.keys[k] {
				return fmt.Errorf("duplicate field %q", k)
			}
			if !top.free && !PlainKey(k) {
				return fmt.Errorf("unknown field %q", k)
			}
			top.keys[k] = true
			top.expectKey = false
			top.lastKey = k
			continue
		}
		// The field whose value tok is (or opens), if checked.
		field := ""
		free := false
		if n := len(stack); n > 0 {
			top := stack[n-1]
			free = top.free || (top.object && rules.Free[top.lastKey])
			if top.object && !free {
				field = top.lastKey
			}
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if tok == json.Delim('[') && rules.Binary[field] {
				return fmt.Errorf("field %q must be a standard base64 string", field)
			}
			if len(stack) >= MaxJSONDepth {
				return fmt.Errorf("nested deeper than %d", MaxJSONDepth)
			}
			stack = append(stack, &frame{object: tok == json.Delim('{'), expectKey: true, free: free, keys: map[string]bool{}})
		case json.Delim(']'):
			stack = stack[:len(stack)-1]
			done()
		default:
			if s, ok := tok.(string); ok && rules.Binary[field] {
				if _, err := base64.StdEncoding.DecodeString(s); err != nil {
					return fmt.Errorf("field %q is not valid standard base64", field)
				}
			}
			if min, ok := rules.Min[field]; ok {
				if f, isNum := tok.(float64); isNum && f < min {
					return fmt.Errorf("field %q must be at least %g", field, min)
				}
			}
			done()
		}
	}
}

// PlainKey reports whether k is a field name of this API: a-z, 0-9, _.
// Anything else is refused: encoding/json folds case, and with it 'ſ'
// (U+017F) to 's' and the Kelvin sign to 'k'.
func PlainKey(k string) bool {
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}
