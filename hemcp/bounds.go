package hemcp

import (
	"context"
	"encoding/json"
	"fmt"
	"math/bits"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// Cost caps. A tool call's work grows with what it is given; each call is
// held to these before anything is evaluated, and its arguments are
// counted (without decoding them) before the MCP SDK decodes them, which
// costs far more than the bytes: an outside review's 33 MiB he_linear
// call took 1.3 GB and 19 s, most of it decoding and checking the JSON.
const (
	// WeightsPerSlot bounds a matrix (he_linear's weights, a --models
	// model, a --context's embeddings): at most WeightsPerSlot times the
	// version's slots values (m·n), and at most the slots rows. At
	// ckks-logn13 (4,096 slots): 131,072 values, e.g. 1,000 items of 128
	// dimensions. It bounds the decoding and the walk of the matrix.
	WeightsPerSlot = 32
	// MatrixWork bounds a matrix's columns: n, rounded up to a power of
	// two, times the slots, at most MatrixWork (and n at most the slots).
	// The evaluation does one plaintext product per diagonal (as many as
	// the rounded columns) and about twice their square root in rotations,
	// each costing in proportion to the slots, and far more from
	// ckks-logn14 up, whose scale (2^55) Lattigo encodes in big floats:
	// 512 columns at ckks-logn13, 256 at ckks-logn14, 128 at ckks-logn15.
	// Without it, one he_linear over all 8,192 slots of a ckks-logn14
	// version took 250 s (BENCHMARKS.md).
	MatrixWork = 1 << 21
	// MaxAggregateInputs is he_aggregate's most ciphertexts: kmsd attests
	// an evaluation of at most this many inputs.
	MaxAggregateInputs = wire.MaxAttestInputs
	// envelopeValues bounds the JSON values of one envelope (12 with its
	// attestation), with room to spare.
	envelopeValues = 32
	// argsValues is the allowance for the other members of a tool's
	// arguments (the object itself, the op, the model or context name).
	argsValues = 16
)

// matrixCaps are the caps of a matrix under a version of slots slots.
type matrixCaps struct {
	rows, cols, total int
	colsSlots         int // the slots cols comes from
	slots             int // the slots rows and total come from
}

func capsFor(slots int) matrixCaps {
	return matrixCaps{rows: slots, cols: min(slots, MatrixWork/slots), total: WeightsPerSlot * slots, colsSlots: slots, slots: slots}
}

// loosest is, cap by cap, the loosest of c and o.
func (c matrixCaps) loosest(o matrixCaps) matrixCaps {
	if o.cols > c.cols {
		c.cols, c.colsSlots = o.cols, o.colsSlots
	}
	if o.slots > c.slots {
		c.rows, c.total, c.slots = o.rows, o.total, o.slots
	}
	return c
}

// check checks an m×n matrix (total values in all, named what in an
// error) against the caps.
func (c matrixCaps) check(what string, rows, cols, total int) error {
	switch {
	case rows > c.rows:
		return fmt.Errorf("%s: %d rows; the cap is %d (the slots of the version)", what, rows, c.rows)
	case cols > c.cols:
		return fmt.Errorf("%s: %d columns; the cap is %d (2^%d over the %d slots of the version, at most the slots: the evaluation's work grows with both)", what, cols, c.cols, bits.Len(MatrixWork)-1, c.colsSlots)
	case total > c.total:
		return fmt.Errorf("%s: %d values (m·n); the cap is %d (%d per slot of the version's %d slots)", what, total, c.total, WeightsPerSlot, c.slots)
	}
	return nil
}

// limits are the loosest caps of the versions loaded, which a call is held
// to before its version is known, and the largest levels.
func (s *Server) limits() (caps matrixCaps, levels int) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, sk := range s.served {
		for _, l := range sk.engines {
			caps, levels = caps.loosest(capsFor(l.eng.Slots())), max(levels, l.eng.params.MaxLevel())
		}
	}
	return caps, levels
}

// matrixShape is a matrix's rows, widest row and values.
func matrixShape(W [][]float64) (rows, cols, total int) {
	for _, r := range W {
		cols, total = max(cols, len(r)), total+len(r)
	}
	return len(W), cols, total
}

// polynomialCap checks a polynomial's coefficients against a version's
// levels: degree d takes d levels.
func polynomialCap(n, levels int) error {
	if n > levels+1 {
		return fmt.Errorf("the coefficients: %d; the cap is %d (degree %d: the levels of the version)", n, levels+1, levels)
	}
	return nil
}

// aggregateCap checks he_aggregate's number of ciphertexts.
func aggregateCap(n int) error {
	if n > MaxAggregateInputs {
		return fmt.Errorf("the ciphertexts: %d; the cap is %d (kmsd attests an evaluation of at most %d inputs)", n, MaxAggregateInputs, MaxAggregateInputs)
	}
	return nil
}

// checkCost is a receiving middleware: a tools/call whose arguments are
// past a cap is refused (a tool error) before the SDK decodes them. The
// caps here are the loosest of the versions loaded; each tool checks its
// own version's once it knows it.
func (s *Server) checkCost(next mcp.MethodHandler) mcp.MethodHandler {
	return func(ctx context.Context, method string, req mcp.Request) (mcp.Result, error) {
		r, ok := req.(*mcp.CallToolRequest)
		if method != "tools/call" || !ok || r.Params == nil {
			return next(ctx, method, req)
		}
		start := time.Now()
		err := s.precheck(r.Params.Name, r.Params.Arguments)
		if err == nil {
			return next(ctx, method, req)
		}
		s.logCall(r.Params.Name, r, "tool_error", start)
		res := &mcp.CallToolResult{}
		res.SetError(err)
		return res, nil
	}
}

// precheck counts a tool's arguments against its caps.
func (s *Server) precheck(tool string, args json.RawMessage) error {
	caps, levels := s.limits()
	slots := caps.slots
	var allowed int
	var sh shape
	switch tool {
	case "he_describe":
		allowed = argsValues
	case "he_linear":
		sh = shapeOf(args, "weights", "bias")
		if err := caps.check("the weights", sh.items[0], sh.widest[0], sh.leaves[0]); err != nil {
			return err
		}
		if sh.items[1] > slots {
			return fmt.Errorf("the bias: %d values; the cap is %d (the slots of the version)", sh.items[1], slots)
		}
		allowed = argsValues + envelopeValues + 2 + slots + WeightsPerSlot*slots + slots
	case "he_polynomial":
		sh = shapeOf(args, "coefficients")
		if err := polynomialCap(sh.items[0], levels); err != nil {
			return err
		}
		allowed = argsValues + envelopeValues + 1 + levels + 1
	case "he_aggregate":
		sh = shapeOf(args, "ciphertexts")
		if err := aggregateCap(sh.items[0]); err != nil {
			return err
		}
		allowed = argsValues + 1 + MaxAggregateInputs*envelopeValues
	case "he_similarity":
		allowed = argsValues + envelopeValues
	case "he_rekey":
		allowed = argsValues + envelopeValues + 1
	default:
		return nil // not a tool of this server: the SDK says so
	}
	if sh.items == nil {
		sh = shapeOf(args)
	}
	if sh.values > allowed {
		return fmt.Errorf("the arguments hold %d JSON values; the cap for %s is %d", sh.values, tool, allowed)
	}
	return nil
}

// shape is what shapeOf counts in a JSON object.
type shape struct {
	values int // every value, at any depth (an array or object is one, and so are its elements)
	// For each key asked for whose value is an array: its elements,
	// the elements of the arrays among them, and the longest of those.
	items, leaves, widest []int
}

// shapeOf counts the values of the JSON object raw (valid JSON: the SDK
// has parsed the request around it) without decoding any, and the
// elements of the top-level members named keys that are arrays (summed
// over repeated members).
func shapeOf(raw []byte, keys ...string) shape {
	sh := shape{items: make([]int, len(keys)), leaves: make([]int, len(keys)), widest: make([]int, len(keys))}
	var stack []byte // '{' or '[' of each open container
	cur := -1        // the key of the top-level member being read, or -1
	row := 0         // elements of the current row of cur
	expectKey := false
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch c {
		case ' ', '\t', '\n', '\r', ':':
			continue
		case ',':
			expectKey = len(stack) > 0 && stack[len(stack)-1] == '{'
			continue
		case ']', '}':
			if len(stack) == 3 && cur >= 0 {
				sh.widest[cur] = max(sh.widest[cur], row)
			}
			if len(stack) > 0 {
				stack = stack[:len(stack)-1]
			}
			expectKey = false
			continue
		}
		if c == '"' && expectKey {
			j := stringEnd(raw, i)
			if len(stack) == 1 {
				var name string
				json.Unmarshal(raw[i:j+1], &name)
				cur = -1
				for k, want := range keys {
					if name == want {
						cur = k
					}
				}
			}
			expectKey, i = false, j
			continue
		}
		// A value starts at i.
		sh.values++
		if cur >= 0 && len(stack) >= 2 && stack[1] == '[' {
			switch {
			case len(stack) == 2:
				sh.items[cur]++
				row = 0
			case len(stack) == 3 && stack[2] == '[':
				sh.leaves[cur]++
				row++
			}
		}
		switch c {
		case '"':
			i = stringEnd(raw, i)
		case '{':
			stack = append(stack, '{')
			expectKey = true
		case '[':
			stack = append(stack, '[')
		default: // a number, true, false or null
			for i+1 < len(raw) && !isJSONDelim(raw[i+1]) {
				i++
			}
		}
	}
	return sh
}

// stringEnd is the index of the quote that closes the string opening at i.
func stringEnd(raw []byte, i int) int {
	for j := i + 1; j < len(raw); j++ {
		switch raw[j] {
		case '\\':
			j++
		case '"':
			return j
		}
	}
	return len(raw) - 1
}

func isJSONDelim(c byte) bool {
	switch c {
	case ',', ']', '}', ':', ' ', '\t', '\n', '\r':
		return true
	}
	return false
}
