package kms

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// MaxJSONDepth is how deeply CheckJSONKeys lets objects and arrays nest.
const MaxJSONDepth = 32

// CheckJSONKeys refuses what encoding/json would quietly accept in a body
// whose fields are all lower case: a duplicate key in any object (the last
// would win), a key in another case (it would match the lower-case field),
// nesting deeper than MaxJSONDepth, and anything after the first value.
// Its error says which, without echoing more than 40 bytes of a key.
func CheckJSONKeys(b []byte) error {
	type frame struct {
		object    bool
		expectKey bool
		keys      map[string]bool
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
			if k != strings.ToLower(k) {
				return fmt.Errorf("unknown field %q", k)
			}
			top.keys[k] = true
			top.expectKey = false
			continue
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if len(stack) >= MaxJSONDepth {
				return fmt.Errorf("nested deeper than %d", MaxJSONDepth)
			}
			stack = append(stack, &frame{object: tok == json.Delim('{'), expectKey: true, keys: map[string]bool{}})
		case json.Delim(']'):
			stack = stack[:len(stack)-1]
			done()
		default:
			done()
		}
	}
}
