"""The agent as a LangGraph StateGraph: policy -> tool -> policy ... -> finalize (DESIGN §3).

`graph` is compiled without a checkpointer, as `langgraph dev` and the LangGraph server want (they
bring their own). Scripts and batch runs call `build_graph(checkpointer=...)` with a SqliteSaver so an
interrupted run resumes from its last step.
"""

from __future__ import annotations

from langgraph.graph import END, START, StateGraph
from langgraph.types import Checkpointer

from graph.configuration import Configuration
from graph.nodes import FINALIZE, POLICY, TOOL_NODES, finalize_node, policy_node, route_from_policy
from graph.state import AgentInput, AgentOutput, AgentState


def build_graph(checkpointer: Checkpointer = None):
    """Compile the agent graph, with `checkpointer` if given.

    Nodes: policy, prompt_gen, image_gen, quality_eval, knowledge_retrieval, mask_gen, finalize.
    """
    builder = StateGraph(AgentState, input_schema=AgentInput, output_schema=AgentOutput, context_schema=None)
    builder.add_node(POLICY, policy_node)
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
    return 2 * config.max_steps + 10


graph = build_graph()
