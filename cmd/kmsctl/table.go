package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// object is a JSON object with its keys in the order they came.
type object struct {
	keys []string
	vals map[string]any
}

// decodeOrdered decodes JSON keeping object key order (the order of the
// wire types' fields), numbers as json.Number.
func decodeOrdered(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			o := &object{vals: map[string]any{}}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				k, _ := kt.(string)
				v, err := decodeOrdered(dec)
				if err != nil {
					return nil, err
				}
				o.keys = append(o.keys, k)
				o.vals[k] = v
			}
			_, err := dec.Token()
			return o, err
		case '[':
			a := []any{}
			for dec.More() {
				v, err := decodeOrdered(dec)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			_, err := dec.Token()
			return a, err
		}
	}
	return tok, nil
}

// printTable prints v (anything printJSON takes) for a person: a list of
// objects as one row each, an object as FIELD VALUE lines with its lists
// of objects as tables below it.
func printTable(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	node, err := decodeOrdered(dec)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	switch n := node.(type) {
	case []any:
		rows(tw, n)
	case *object:
		var lists []string
		for _, k := range n.keys {
			if a, ok := n.vals[k].([]any); ok && len(a) > 0 {
				if _, isObj := a[0].(*object); isObj {
					lists = append(lists, k)
					continue
				}
			}
			fmt.Fprintf(tw, "%s\t%s\n", strings.ToUpper(k), cell(n.vals[k], 0))
		}
		for _, k := range lists {
			tw.Flush()
			fmt.Fprintf(tw, "\n%s:\n", strings.ToUpper(k))
			rows(tw, n.vals[k].([]any))
		}
	default:
		fmt.Fprintln(tw, cell(n, 0))
	}
	return tw.Flush()
}

// rows prints a list of objects, one column per field any of them has.
func rows(tw *tabwriter.Writer, list []any) {
	if len(list) == 0 {
		fmt.Fprintln(tw, "(none)")
		return
	}
	var cols []string
	seen := map[string]bool{}
	for _, it := range list {
		if o, ok := it.(*object); ok {
			for _, k := range o.keys {
				if !seen[k] {
					seen[k] = true
					cols = append(cols, k)
				}
			}
		}
	}
	if cols == nil {
		for _, it := range list {
			fmt.Fprintln(tw, cell(it, cellMax))
		}
		return
	}
	up := make([]string, len(cols))
	for i, c := range cols {
		up[i] = strings.ToUpper(c)
	}
	fmt.Fprintln(tw, strings.Join(up, "\t"))
	for _, it := range list {
		o, _ := it.(*object)
		cells := make([]string, len(cols))
		for i, c := range cols {
			if o != nil {
				if v, ok := o.vals[c]; ok {
					cells[i] = cell(v, cellMax)
				}
			}
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
}

// cellMax is the widest a cell of a row gets.
const cellMax = 80

// cell is one value on one line: scalars as they are, lists of scalars
// joined by commas, objects as field=value pairs; values longer than max
// (when not 0) are cut.
func cell(v any, max int) string {
	var s string
	switch t := v.(type) {
	case nil:
		s = "-"
	case string:
		s = t
	case json.Number:
		s = t.String()
	case bool:
		s = fmt.Sprint(t)
	case []any:
		parts := make([]string, len(t))
		for i, e := range t {
			parts[i] = cell(e, 0)
		}
		s = strings.Join(parts, ",")
	case *object:
		parts := make([]string, 0, len(t.keys))
		for _, k := range t.keys {
			parts = append(parts, k+"="+cell(t.vals[k], 0))
		}
		s = strings.Join(parts, " ")
	}
	s = strings.ReplaceAll(s, "\n", " ")
	if max > 0 && len(s) > max {
		s = s[:max-3] + "..."
	}
	return s
}
