"""The agent as a LangGraph StateGraph: policy -> tool -> policy ... -> finalize (DESIGN §3).

`graph` is the served graph (`langgraph.json`, through `served_graph`): compiled without a checkpointer,
as `langgraph dev` and the LangGraph server want (they bring their own), and it takes its inputs from
anyone who can reach the server, so its runs read images only under `input_root`, write only under
`run_root` and may not change the server's folders. Scripts and
batch runs call `build_graph(checkpointer=...)` with a SqliteSaver so an interrupted run resumes from
its last step. Run settings are the graph's context (`RunSettings`, or a resolved `Configuration`, which
the nodes then use as it is); `configurable` is still read.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from langgraph.graph import END, START, StateGraph
from langgraph.types import Checkpointer

from graph.configuration import Configuration, RunSettings, run_configuration
from graph.nodes import FINALIZE, POLICY, TOOL_NODES, finalize_node, policy_node, route_from_policy
from graph.state import AgentInput, AgentOutput, AgentState
from graph.tracing import configure_tracing

if TYPE_CHECKING:
    from langgraph_sdk.runtime import ServerRuntime


def build_graph(checkpointer: Checkpointer = None, *, served: bool = False):
    """Compile the agent graph, with `checkpointer` if given.

    Nodes: policy, prompt_gen, image_gen, quality_eval, knowledge_retrieval, mask_gen, finalize.
    `served`: a graph for a server's callers: `run_dir` must stay inside `run_root`, and a run may not
    set the server's folders (`graph.configuration.DEPLOYMENT_SETTINGS`).
    """
    configure_tracing()
    builder = StateGraph(AgentState, input_schema=AgentInput, output_schema=AgentOutput, context_schema=RunSettings)
    builder.add_node(POLICY, partial(policy_node, served=served))
    for name, node in TOOL_NODES.items():
        builder.add_node(name, node)
        builder.add_edge(name, POLICY)
    builder.add_node(FINALIZE, finalize_node)
    builder.add_edge(START, POLICY)
    builder.add_conditional_edges(POLICY, route_from_policy, [*TOOL_NODES, POLICY, FINALIZE])
    builder.add_edge(FINALIZE, END)
    return builder.compile(checkpointer=checkpointer, name="anomaly-agent")


def recursion_limit(config: Configuration) -> int:
    """A LangGraph recursion limit that never cuts a run short of its own budget.

    Each tool call takes two super-steps (policy, tool); invalid calls take one; plus start and finalize.
    """
    return 2 * config.budget.max_steps + 10


graph = build_graph(served=True)


def served_graph(runtime: ServerRuntime):
    """`graph`, for one request of a LangGraph server; a run's settings are validated first, by name too.

    Why here and not in the graph: the server keeps only the context keys its schema lists and drops the
    rest before the graph starts, so a misspelled setting (``max_step``) would be silently ignored. The
    server mirrors ``configurable`` into the context, so the two cannot be told apart here: the
    ``configurable`` rule applies (a name close to a setting fails the run, naming the closest one).
    """
    execution = runtime.execution_runtime
    context = execution.context if execution is not None else None
    if isinstance(context, dict):
        run_configuration({"configurable": context}, served=True)
    return graph
