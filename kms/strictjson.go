package kms

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxJSONDepth is how deeply CheckJSONKeys lets objects and arrays nest.
const MaxJSONDepth = 32

// CheckJSONKeys refuses what encoding/json would quietly accept in a body
// whose fields are all lower case: a duplicate key in any object (the last
// would win), a key of any character but a-z, 0-9 and _ (encoding/json
// folds case, and with it 'ſ' to 's' and the Kelvin sign to 'k', so that
// "ſcale" would set scale), nesting deeper than MaxJSONDepth, an array
// where binary names a base64 field (encoding/json takes an array of
// numbers for []byte), and anything after the first value. Its error says
// which, without echoing more than 40 bytes of a key.
func CheckJSONKeys(b []byte, binary map[string]bool) error {
	type frame struct {
		object    bool
		expectKey bool
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
		if err != nil {
			return errors.New("malformed JSON")
		}
		if len(stack) == 0 {
			if values > 0 {
				return errors.New("data after the JSON value")
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
			if !PlainKey(k) {
				return fmt.Errorf("unknown field %q", k)
			}
			top.keys[k] = true
			top.expectKey = false
			top.lastKey = k
			continue
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if n := len(stack); tok == json.Delim('[') && n > 0 && stack[n-1].object && binary[stack[n-1].lastKey] {
				return fmt.Errorf("field %q must be a standard base64 string", stack[n-1].lastKey)
			}
			if len(stack) >= MaxJSONDepth {
				return fmt.Errorf("nested deeper than %d", MaxJSONDepth)
			}
			stack = append(stack, &frame{object: tok == json.Delim('{'), expectKey: true, keys: map[string]bool{}})
		case json.Delim(']'):
			stack = stack[:len(stack)-1]
			done()
		default:
			if n := len(stack); n > 0 && stack[n-1].object && binary[stack[n-1].lastKey] {
				if s, ok := tok.(string); ok {
					if _, err := base64.StdEncoding.DecodeString(s); err != nil {
						return fmt.Errorf("field %q is not valid standard base64", stack[n-1].lastKey)
					}
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
